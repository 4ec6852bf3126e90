"""coinfer: device-edge cooperative inference of split transformer language models.

This package holds what both the device agent and the edge server need: the model
(sliceable at any layer), the tensor codec and shared data types. It imports neither app.
"""

__version__ = "0.1.0"
