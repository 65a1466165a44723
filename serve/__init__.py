"""Ray Serve application: the OpenAI-compatible endpoint over exported checkpoints.

Not implemented yet: see the README's status table.
"""
