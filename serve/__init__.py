"""Ray Serve application: the OpenAI-compatible endpoint over exported checkpoints.

``app`` is the deployment (FastAPI routes, auth, autoscaling), ``openai_api`` parses and answers
requests, ``generation`` batches them into ``generate`` calls. See serve/README.md.
"""
