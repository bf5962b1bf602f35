"""Development tooling outside the product: the demo, the packaged small models, and faithful fakes of
what tests and benchmarks cannot reach (a Hugging Face hub, an echoing node).

It may use every product package; no product package may import it.
"""
