"""LLaVA's own data method: GPT-assisted visual instruction data from captions and boxes (Ray-free parts).

The teacher never sees the pixels: each image is given as its captions and labelled boxes
(``annotations.py``), with a versioned system message and few-shot examples per response type
(``prompts.py``); its answers are turned into LLaVA-format records or rejected with a reason
(``parse.py``); ``client.py`` talks to any OpenAI-compatible endpoint under concurrency, rate and token
limits. The Ray Data pipeline is ``pipelines/generate.py``, the job ``jobs/generate_data.py``.
"""
