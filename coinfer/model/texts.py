"""Built-in held-out text for accuracy checks of lossy settings (weight precision, codecs).

Plain English prose written for this project, not taken from any dataset, so that it is not
in any calibration data and stays the same for every run.
"""

HELDOUT_PROSE = """\
The village of Aldermoor sits at the edge of a wide valley, where the river bends twice before it reaches the sea. For most of its history the people there lived by farming and fishing, and the rhythm of the seasons decided nearly everything: when the fields were ploughed, when the boats went out, and when the market filled with traders from the neighbouring towns. In winter the roads often flooded, and for weeks at a time the village was cut off from the rest of the county.

Things began to change when the railway arrived. A small station was built on the northern side of the river, and within a few years the population had doubled. New houses appeared along the main road, a school was opened, and the old mill was turned into a workshop that repaired engines and farm machinery. Some of the older residents complained that the village had lost its quiet character, but most welcomed the new opportunities. Young people no longer had to leave in search of work, and the shops stayed open later than ever before.

Today Aldermoor is known for its annual autumn fair, which attracts visitors from across the region. Stalls sell local cheese, apples, honey and bread, while musicians play in the square and children race along the riverbank. The fair began as a simple harvest celebration, but it has grown into an event that supports many small businesses throughout the year. Local historians have collected photographs and letters that show how the village changed over the last century, and a small museum near the church displays tools, maps and clothing from the early days of the railway.
"""
