"""Device agent: runs the head of the split model, compresses what crosses the link,
and serves apps over OpenAI-compatible REST. (Serving lands with the split-serving issue.)"""
