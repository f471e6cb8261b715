"""The bench's own tests count the Triton path's launches and traffic under Triton's interpreter,
which triton picks when it is imported: set before anything imports it."""

import os

os.environ["TRITON_INTERPRET"] = "1"
