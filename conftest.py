"""Collection rules for the whole repository (tests/conftest.py configures the tests).

Flax and Equinox are optional: without them, the doctests of their adapters are not
collected (each adapter raises an ImportError naming the `pip install`; tests/test_nnx.py,
tests/test_linen.py and tests/test_equinox.py check).
"""

import importlib.util

collect_ignore = []
if importlib.util.find_spec("flax") is None:
    collect_ignore += ["jaxlinear/nnx.py", "jaxlinear/_src/nnx.py"]
    collect_ignore += ["jaxlinear/linen.py", "jaxlinear/_src/linen.py"]
if importlib.util.find_spec("equinox") is None:
    collect_ignore += ["jaxlinear/equinox.py", "jaxlinear/_src/equinox.py"]
