"""Generation: the engines that answer chat requests, behind one interface.

    engine = open_engine("transformers", "/path/to/export", model_name="tiny", device="cpu", dtype="auto")  # or "vllm"
    prepared = engine.prepare(GenerationRequest(conversation=[...], images=[...], max_tokens=16, temperature=0))
    [completion] = asyncio.run(engine.complete([prepared]))

- ``request.py``: ``GenerationRequest``, ``Prepared``, ``Completion``, ``RequestError``, ``prepare_request``
  (the checkpoint's template and processor, the same for every engine).
- ``engine.py``: the ``GenerationEngine`` protocol, the registry (``open_engine``), ``answer_questions``.
- ``plan.py``: ``InferencePlan``, what batch inference runs (built from ``config.schema.InferenceConfig``).
- ``transformers.py``: ``TransformersEngine`` (``model.generate`` in this process, static batches).
- ``vllm.py``: ``VllmClient`` (a ``vllm_engine.VllmEngine`` actor in vLLM's own environment).

The Serve app and batch inference use only the protocol; nothing imports Ray at import time, and this
package's ``__init__`` imports nothing (the config imports ``plan.py`` without torch).
"""
