"""Ray Data pipelines: read LLaVA-format data, decode, tile and tokenise into Arrow batches.

Built on the core library's pure functions (``llava_platform.data``). Not implemented yet: see
the README's status table.
"""
