"""quantpub: one model in, a published family of quantized variants out.

The flow, one module per stage: matrix -> plan -> worker -> evaluate -> card -> publish.
"""

__version__ = "0.1.0"
