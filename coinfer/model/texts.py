"""Built-in texts for accuracy checks of lossy settings (weight precision, codecs).

Plain English prose (stories, dialogue, a recipe, science and news-like paragraphs) written
for this project, not taken from any dataset, so they stay the same for every run.
HELDOUT_PROSE (~1,050 SmolLM2 tokens) is what benchmarks and tests judge on; CALIBRATION_PROSE
(~550 tokens, other topics) is what `coinfer calibrate` measures the codec table on, so a
benchmark never scores a codec on the text its table came from.
"""

HELDOUT_PROSE = """\
The village of Aldermoor sits at the edge of a wide valley, where the river bends twice before it reaches the sea. For most of its history the people there lived by farming and fishing, and the rhythm of the seasons decided nearly everything: when the fields were ploughed, when the boats went out, and when the market filled with traders from the neighbouring towns. In winter the roads often flooded, and for weeks at a time the village was cut off from the rest of the county.

Things began to change when the railway arrived. A small station was built on the northern side of the river, and within a few years the population had doubled. New houses appeared along the main road, a school was opened, and the old mill was turned into a workshop that repaired engines and farm machinery. Some of the older residents complained that the village had lost its quiet character, but most welcomed the new opportunities. Young people no longer had to leave in search of work, and the shops stayed open later than ever before.

Today Aldermoor is known for its annual autumn fair, which attracts visitors from across the region. Stalls sell local cheese, apples, honey and bread, while musicians play in the square and children race along the riverbank. The fair began as a simple harvest celebration, but it has grown into an event that supports many small businesses throughout the year. Local historians have collected photographs and letters that show how the village changed over the last century, and a small museum near the church displays tools, maps and clothing from the early days of the railway.

When Mara took over the bakery from her uncle, she found a notebook hidden behind the flour bins. It was full of recipes written in pencil, some crossed out and rewritten three or four times. Next to a recipe for rye bread her uncle had written: "Too sour in summer. Use less starter when the kitchen is warm." She laughed when she read it, because she had made exactly that mistake during her first week, and the regular customers had been too polite to complain.

"You changed the bread," said Mr. Okafor one morning, holding up a loaf as if it were evidence in a trial.
"Is it worse?" Mara asked.
"No," he said after a pause. "It is better. But now I have to get used to it all over again."

Running a small shop turned out to be less about baking and more about planning. Flour had to be ordered two weeks in advance, the oven needed a technician twice a year, and the rent went up every spring. Mara kept a spreadsheet with every expense and learned to predict which days would be busy. Rainy Mondays were quiet; the Saturday before a holiday could empty the shelves by ten o'clock. She started baking smaller batches in the afternoon, which meant less waste and fresher bread for the people who came home late from work.

To make a simple loaf at home, you need only four ingredients: flour, water, salt and yeast. Mix five hundred grams of flour with ten grams of salt and seven grams of dried yeast. Add about three hundred and fifty millilitres of lukewarm water and stir until no dry flour remains. Knead the dough for ten minutes, until it feels smooth and springs back when you press it with a finger. Leave it covered in a warm place for an hour, shape it gently, let it rise again for forty minutes, and bake it at two hundred and twenty degrees for about thirty-five minutes. The loaf is done when it sounds hollow as you tap the bottom.

Scientists who study sleep have found that the brain is far from idle at night. During deep sleep, memories from the day are replayed and strengthened, while less important details fade. Dreaming, which happens mostly in a later stage of sleep, may help people process emotions and connect ideas that seemed unrelated. Missing a single night of sleep makes it harder to concentrate and to judge risks, and over long periods poor sleep is linked to a weaker immune system. Most adults need between seven and nine hours, although the exact amount differs from person to person.

The committee met on Thursday to discuss the new bicycle lanes. Supporters argued that safer routes would encourage more people to cycle to school and to work, reducing traffic and noise in the town centre. Several shop owners worried that removing parking spaces would keep customers away. After two hours of debate, the members agreed on a trial: the lanes would be painted on two streets for six months, and the council would count cyclists, cars and shoppers before and after the change. A final decision was postponed until the results are known.

Years later, the notebook sits on a shelf above the counter, next to a photograph of her uncle standing in front of the old oven. New recipes have been added in Mara's handwriting, in blue ink, and one page at the back lists the names of every person who has worked in the shop. Customers sometimes ask to look at it. She always lets them, as long as they promise not to get flour on the pages.
"""


CALIBRATION_PROSE = """\
The harbour master kept a logbook for forty years. Every morning he wrote down the wind, the height of the tide and the names of the boats that left before sunrise. When the storms came in autumn, the entries grew short and hurried, and sometimes a page held nothing but a date and the word "closed". His granddaughter found the books in a wooden chest after he died, and she spent a winter reading them by the stove. She learned that the herring had vanished one spring and returned nine years later, that a whale had once followed the ferry for an afternoon, and that her grandfather had twice refused to let the lifeboat go out because the sea was worse than anyone believed.
Modern weather forecasts combine measurements from satellites, balloons, ships and ground stations with computer models of the atmosphere. The models divide the air into a grid of boxes and calculate how heat, moisture and momentum move between them. Because small errors grow over time, forecasters run the same model many times with slightly different starting conditions and look at how much the results disagree. A forecast that all the runs agree on is more trustworthy than one where they scatter.
"Do you know how to fix a puncture?" asked Tomas, holding up the deflated tyre.
"Roughly," said Ines. "Take the wheel off, find the hole, patch it, and hope it was the only one."
"And if it wasn't?"
"Then we walk, and we stop for ice cream on the way."
To clean a cast iron pan, let it cool a little, then rinse it with hot water and scrub off any food with a stiff brush. Avoid soaking it, because standing water causes rust. Dry it completely on the stove over low heat, then rub a thin layer of oil over the inside with a paper towel. Stored this way, the pan becomes smoother and more non-stick with every use, and it can last for generations.
The city council approved a plan on Monday to plant two thousand trees along its busiest roads over the next five years. Officials said the trees would provide shade, reduce noise and help absorb rainwater during heavy storms. Residents will be able to request a tree outside their own homes through a new online form. The first planting is expected to begin in the spring, starting with the streets near the hospital and the central library.
Learning a second language as an adult is slower than it is for children, but adults have advantages too. They can study grammar deliberately, use dictionaries and apps, and connect new words to things they already know. Regular short practice tends to work better than occasional long sessions, and speaking with real people, even with mistakes, builds confidence faster than reading alone.
"""
