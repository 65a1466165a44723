"""Per-GPU memory of a training stage, before launch: will the recipe fit, and if not, what change fits.

    print(plan("stage2", setup, gpu_memory_gb=80).table())   # setup: a StageSetup (config/memory_plan.py
                                                             # builds it from a recipe for `--dry-run`)

The model states (weights, gradients, optimizer states) follow DeepSpeed's own estimators
(``estimate_zero2_model_states_mem_needs`` / ``estimate_zero3_model_states_mem_needs``: 2 + 18/N
bytes per trainable parameter under ZeRO-2 in bf16, 18/N + the largest layer under ZeRO-3), extended
to what DeepSpeed's functions assume away: frozen parts (weights only), LoRA, fp32 training and
optimizer offload; checked against two real ranks (``tests/integration/train/test_memory_plan.py``, within
20 %). Activations count what autograd saves per token of each part (``saved_activation_bytes``, calibrated
against ``saved_tensors_hooks`` on LLaVA, NeXT and OneVision with and without gradient checkpointing:
``python -m jobs.perf.activations``, a unit test holds it within 25 %), plus the logits and their gradients;
they are planned for the data's largest sample (the preprocessing manifest's ``lengths``; a packed row with
``data.packing``), else for ``model_max_length``. Host memory (loading, optimizer offload, the streamed
export) is planned per worker (``host_memory``).

Model shapes come from a local ``config.json``, the recipe's ``tiny`` towers, or ``KNOWN_SHAPES``
(the published configs of the models the shipped recipes name), so a dry run needs no download.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

GB = 1024**3
REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (our configs keep it): the gradient bucket's elements."""
USABLE_FRACTION = 0.9
"""Share of a GPU's memory a stage may plan for: the rest is the CUDA context, NCCL buffers and
allocator fragmentation."""


@dataclass(frozen=True)
class TransformerShape:
    """The numbers of a transformer stack that its memory depends on (a Hugging Face config's)."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int | None = None
    """Key/value heads (grouped-query attention); ``None``: as many as ``heads``."""
    vocab: int = 0
    """Token embedding rows (0 for a vision tower); the LM head is counted as a second matrix of the same size."""
    tokens_per_tile: int = 0
    """Vision towers: patch tokens (+ CLS) per image tile."""
    patch_size: int = 0
    """Vision towers: ViT patch size in pixels."""
    gated_mlp: bool = True
    """SwiGLU MLPs (Llama, Qwen, Mistral: three matrices) or plain two-matrix MLPs (CLIP, SigLIP)."""

    @property
    def kv_dim(self) -> int:
        return self.hidden * (self.kv_heads or self.heads) // self.heads

    @property
    def layer_params(self) -> int:
        """One block's weights (norms and biases left out: under 0.1 %)."""
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_dim
        return attention + (3 if self.gated_mlp else 2) * self.hidden * self.intermediate

    @property
    def params(self) -> int:
        return self.layers * self.layer_params + 2 * self.vocab * self.hidden

    @property
    def largest_layer_params(self) -> int:
        """The biggest single parameter a ZeRO-3 rank gathers whole (an embedding, else a block)."""
        return max(self.vocab * self.hidden, self.layer_params)


def _clip_l_336() -> TransformerShape:
    return TransformerShape(hidden=1024, layers=24, intermediate=4096, heads=16, tokens_per_tile=577,
                            patch_size=14, gated_mlp=False)


def _siglip_so400m_384() -> TransformerShape:
    return TransformerShape(hidden=1152, layers=27, intermediate=4304, heads=16, tokens_per_tile=729,
                            patch_size=14, gated_mlp=False)


KNOWN_SHAPES: dict[str, TransformerShape] = {
    # vision towers
    "openai/clip-vit-large-patch14-336": _clip_l_336(),
    "google/siglip-so400m-patch14-384": _siglip_so400m_384(),
    # language models, as their published config.json files give them
    "lmsys/vicuna-7b-v1.5": TransformerShape(4096, 32, 11008, 32, 32, 32000),
    "lmsys/vicuna-13b-v1.5": TransformerShape(5120, 40, 13824, 40, 40, 32000),
    "mistralai/Mistral-7B-Instruct-v0.2": TransformerShape(4096, 32, 14336, 32, 8, 32000),
    "meta-llama/Meta-Llama-3-8B-Instruct": TransformerShape(4096, 32, 14336, 32, 8, 128256),
    "NousResearch/Nous-Hermes-2-Yi-34B": TransformerShape(7168, 60, 20480, 56, 8, 64000),
    "Qwen/Qwen1.5-72B-Chat": TransformerShape(8192, 80, 24576, 64, 64, 152064),
    "Qwen/Qwen1.5-110B-Chat": TransformerShape(8192, 80, 49152, 64, 8, 152064),
    "Qwen/Qwen2-7B-Instruct": TransformerShape(3584, 28, 18944, 28, 4, 152064),
}
"""Shapes of the models the shipped recipes name (hub ids), so that a dry run needs no download."""
KNOWN_LLAVA: dict[str, tuple[str, str]] = {
    "llava-hf/llava-onevision-qwen2-7b-ov-hf": ("Qwen/Qwen2-7B-Instruct", "google/siglip-so400m-patch14-384"),
}
"""Published LLaVA checkpoints the shipped recipes start from: (language model, vision tower) in ``KNOWN_SHAPES``."""


def shape_from_config(config: dict, *, image_size: int | None = None) -> TransformerShape:
    """A ``TransformerShape`` from a Hugging Face ``config.json`` (a text or vision config)."""
    patch = config.get("patch_size")
    tokens = 0
    if patch:
        size = image_size or config.get("image_size", 336)
        tokens = (size // patch) ** 2 + (1 if config.get("model_type", "").startswith("clip") else 0)
    return TransformerShape(
        hidden=config["hidden_size"], layers=config["num_hidden_layers"], intermediate=config["intermediate_size"],
        heads=config["num_attention_heads"], kv_heads=config.get("num_key_value_heads"),
        vocab=0 if patch else config.get("vocab_size", 0), tokens_per_tile=tokens, patch_size=patch or 0,
        gated_mlp=not patch)


class UnknownShapeError(LookupError):
    """A model whose shape is neither local nor in ``KNOWN_SHAPES``."""


def shape_of(name_or_path: str, *, vision: bool, image_size: int | None = None) -> TransformerShape:
    """The shape of a hub id or a local model folder (a LLaVA checkpoint: its text or vision part).

    Raises:
        UnknownShapeError: no local ``config.json`` and not in ``KNOWN_SHAPES``.
    """
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        part = config.get("vision_config" if vision else "text_config", config)
        if vision and "vision_config" not in config and "vision_config" in part:
            part = part["vision_config"]
        return shape_from_config(part, image_size=image_size)
    if name_or_path in KNOWN_LLAVA:
        name_or_path = KNOWN_LLAVA[name_or_path][1 if vision else 0]
    if name_or_path in KNOWN_SHAPES:
        return KNOWN_SHAPES[name_or_path]
    raise UnknownShapeError(f"{name_or_path}: no local config.json and not in llava_platform.train.memory.KNOWN_SHAPES")


@dataclass(frozen=True)
class SampleLengths:
    """Tokens (image tokens included) and vision inputs (tiles + video frames) per sample of a stage's data:
    the largest and the 99th percentile (``of``; the preprocessing manifest's ``lengths``)."""

    max_tokens: int
    p99_tokens: int
    max_tiles: int
    p99_tiles: int
    rows: int

    @classmethod
    def of(cls, tokens, tiles) -> SampleLengths:
        """From every row's token and tile counts (sequences of ints)."""
        import numpy as np

        tokens, tiles = np.asarray(tokens), np.asarray(tiles)
        if tokens.size == 0:
            return cls(0, 0, 0, 0, 0)
        p99 = dict(q=99, method="higher")  # a real row's count
        return cls(int(tokens.max()), int(np.percentile(tokens, **p99)), int(tiles.max()),
                   int(np.percentile(tiles, **p99)), int(tokens.size))

    def as_dict(self) -> dict[str, int]:
        return dict(vars(self))


@dataclass(frozen=True)
class StageSetup:
    """What a stage's per-GPU memory depends on (all plain numbers: the planner is pure)."""

    lm: TransformerShape
    tower: TransformerShape
    projector_params: int
    tunable: tuple[str, ...]
    lora_rank: int | None
    lora_targets: tuple[str, ...]
    zero_stage: int
    offload_optimizer: bool
    precision: str
    world_size: int
    micro_batch_size: int
    max_length: int
    tiles_per_sample: int
    gradient_checkpointing: bool
    overlap_comm: bool = True
    """DeepSpeed's ``overlap_comm`` (on GPUs): ZeRO-2 then reduces through two bucket buffers."""
    image_tokens: int = 0
    """Tokens of the largest image in the sequence (``data.geometry.image_token_count``): a shorter
    ``model_max_length`` than this plus some text would drop every sample with such an image."""
    typical: SampleLengths | None = None
    """The data's lengths (its 99th percentiles: a typical micro-batch); ``None``: unknown (no manifest)."""
    lengths_from: str = ("model_max_length (every sample as long as allowed: no preprocessing manifest; "
                         "after jobs.preprocess the plan uses the data's own lengths)")
    """Where ``max_length`` and ``tiles_per_sample`` come from, for the table."""
    export_shard_bytes: int = 0
    """The export's largest shard (``checkpoint.export_shard_mb``): what its writer holds at a time."""
    sequences_per_row: int = 1
    """Sequences the model runs per row: 2 for preference pairs (both answers, on the media tiled twice)."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU (one rank), by kind."""

    weights: int
    gradients: int
    optimizer: int
    buffers: int
    """DeepSpeed's gradient bucket buffers (which its estimators leave out)."""
    activations: int
    trainable_params: int
    total_params: int

    @property
    def model_states(self) -> int:
        """Weights, gradients and optimizer states: what DeepSpeed's estimators count."""
        return self.weights + self.gradients + self.optimizer

    @property
    def engine(self) -> int:
        """Everything the DeepSpeed engine holds: the model states and its buffers."""
        return self.model_states + self.buffers

    @property
    def total(self) -> int:
        return self.engine + self.activations


def lora_params(lm: TransformerShape, rank: int, targets: tuple[str, ...]) -> int:
    """LoRA adapter parameters: ``rank x (in + out)`` per targeted matrix per block."""
    shapes = {"q_proj": (lm.hidden, lm.hidden), "o_proj": (lm.hidden, lm.hidden), "k_proj": (lm.hidden, lm.kv_dim),
              "v_proj": (lm.hidden, lm.kv_dim), "gate_proj": (lm.hidden, lm.intermediate),
              "up_proj": (lm.hidden, lm.intermediate), "down_proj": (lm.intermediate, lm.hidden)}
    return lm.layers * sum(rank * sum(shapes[name]) for name in targets if name in shapes)


def estimate(setup: StageSetup) -> MemoryEstimate:
    """Per-GPU bytes of one stage (see the module docstring for the rules and where they come from)."""
    n, wb = setup.world_size, (4 if setup.precision == "fp32" else 2)
    total = setup.lm.params + setup.tower.params + setup.projector_params
    trainable = setup.projector_params if "projector" in setup.tunable else 0
    trainable += setup.tower.params if "vision_tower" in setup.tunable else 0
    adapters = 0
    if "language_model" in setup.tunable:
        if setup.lora_rank:
            adapters = lora_params(setup.lm, setup.lora_rank, setup.lora_targets)
            trainable += adapters
        else:
            trainable += setup.lm.params
    total += adapters
    # DeepSpeed's estimators, per trainable parameter: 16 bytes of fp32 state (master weights 4, Adam's
    # two moments 8, fp32 gradients 4), partitioned from ZeRO-1 on; 16-bit gradients whole at ZeRO-0/1,
    # partitioned at ZeRO-2 (2 P + 18 P / N in all), reduced straight into the fp32 partition at
    # ZeRO-3 (4 x the largest layer + 18 P / N). The 16-bit weights of every parameter, trainable or
    # not: whole below ZeRO-3. Offloading the optimizer moves gradients and states to CPU memory.
    optimizer = 16 * trainable // (n if setup.zero_stage >= 1 else 1)
    if setup.zero_stage == 3:
        weights, gradients = wb * total // n + 4 * setup.lm.largest_layer_params, 0
    else:
        weights, gradients = wb * total, wb * trainable // (n if setup.zero_stage == 2 else 1)
    if setup.offload_optimizer:
        gradients, optimizer = 0, 0
    # Gradient buckets: ZeRO-3 copies gradients into one flat bucket of reduce_bucket_size elements before
    # reduce-scattering them; ZeRO-2 with overlap_comm alternates two. Touched only as far as gradients fill them.
    bucket = wb * min(REDUCE_BUCKET_ELEMENTS, trainable)
    buffers = bucket if setup.zero_stage == 3 else 2 * bucket if setup.zero_stage == 2 and setup.overlap_comm else 0
    return MemoryEstimate(weights=weights, gradients=gradients, optimizer=optimizer, buffers=buffers,
                          activations=activation_bytes(setup), trainable_params=trainable, total_params=total)


def activation_bytes(setup: StageSetup) -> int:
    """Activation memory of one micro-batch at its peak: what autograd keeps for the backward pass
    (``saved_activation_bytes``) plus the logits and their gradients, alive when the backward pass starts."""
    wb = 4 if setup.precision == "fp32" else 2
    text_tokens = setup.micro_batch_size * setup.sequences_per_row * setup.max_length
    return saved_activation_bytes(setup) + text_tokens * setup.lm.vocab * (wb + 4 + wb)


def saved_activation_bytes(setup: StageSetup) -> int:
    """Peak bytes of the tensors autograd saves for the backward pass, in values per token of each part
    (measured with ``saved_tensors_hooks``: ``python -m jobs.perf.activations``; within 25 %).

    A language-model block keeps ``8 h + 2 kv + 4 i`` values per token when its weights train (the inputs of
    its projections, SDPA's query, keys, values and output, the MLP's gate, up and product) and ``5 h + 2 kv
    + 3 i`` when frozen with gradients flowing through it (stage 1: no projection input is needed); in 16-bit
    precision its two RMSNorms also keep a float32 copy of their input. A vision-tower block keeps about
    ``9 h + 2 i`` per patch token when it trains (and its patch embedding the pixels), nothing when frozen (no
    gradient flows into it). With
    gradient checkpointing, each block keeps only its input and one block is recomputed at a time. The loss
    keeps float32 log-probabilities over the vocabulary for every token.
    """
    wb = 4 if setup.precision == "fp32" else 2
    norms = 2 * (4 // wb - 1)  # float32 copies (in values of wb bytes) per hidden unit, in 16-bit precision
    lm, tower = setup.lm, setup.tower
    lm_trains = "language_model" in setup.tunable
    sequences = setup.micro_batch_size * setup.sequences_per_row
    text_tokens = sequences * setup.max_length
    vision_tokens = sequences * setup.tiles_per_sample * tower.tokens_per_tile

    def stack(layers: int, tokens: int, hidden: int, per_block: int) -> tuple[int, int]:
        """(kept from the forward pass, recomputed in the backward pass) of a stack of blocks."""
        if setup.gradient_checkpointing:
            return layers * tokens * hidden * wb, per_block * wb
        return layers * per_block * wb, 0

    lm_kept, lm_recomputed = stack(lm.layers, text_tokens, lm.hidden, text_tokens * (
        (8 if lm_trains else 5) * lm.hidden + 2 * lm.kv_dim + (4 if lm_trains else 3) * lm.intermediate
        + norms * lm.hidden))
    tower_kept = tower_recomputed = projector = 0
    if "vision_tower" in setup.tunable:
        tower_kept, tower_recomputed = stack(tower.layers, vision_tokens, tower.hidden,
                                             vision_tokens * (9 * tower.hidden + 2 * tower.intermediate))
        tower_kept += vision_tokens * 3 * tower.patch_size**2 * wb  # the patch embedding's pixels
    if "projector" in setup.tunable:
        projector = vision_tokens * (tower.hidden + 2 * lm.hidden) * wb
    head = text_tokens * ((lm.hidden if lm_trains else 0) + (2 + norms) * lm.hidden) * wb  # lm_head, final norm
    head += text_tokens * lm.vocab * 4  # the loss's float32 log-probabilities
    # the backward pass frees as it goes: the head before the language model's blocks are recomputed, the
    # language model before the tower's
    return max(lm_kept + tower_kept + projector + head, lm_kept + lm_recomputed + tower_kept + projector,
               tower_kept + tower_recomputed)


@dataclass(frozen=True)
class HostMemory:
    """CPU memory of one worker (rank) beyond its process, by phase; a node holds the sum of its workers'."""

    load: int
    """Reading the starting checkpoint: under ZeRO-3 the worker's own partition, read slice by slice
    (``train.partitioned``); below ZeRO-3 every worker loads the whole model before DeepSpeed moves it."""
    offload: int
    """Optimizer states and float32 gradients kept in CPU memory (``deepspeed.offload_optimizer``)."""
    export: int
    """Rank 0 only, at the end: one shard of the streamed export (``checkpoint.export_shard_mb``) or the
    largest single tensor, whichever is larger."""


def host_memory(setup: StageSetup) -> HostMemory:
    """Per-worker CPU memory of a stage (see ``HostMemory``)."""
    wb = 4 if setup.precision == "fp32" else 2
    states = estimate(setup)
    weights = wb * states.total_params
    load = weights // setup.world_size if setup.zero_stage == 3 else weights
    offload = 16 * states.trainable_params // setup.world_size if setup.offload_optimizer else 0
    largest = wb * max(setup.lm.vocab * setup.lm.hidden, setup.lm.intermediate * setup.lm.hidden)
    return HostMemory(load=load, offload=offload, export=max(setup.export_shard_bytes, largest))


@dataclass(frozen=True)
class ReferenceMemory:
    """A DPO stage's frozen reference policy, two ways (bytes): what ``pipelines.reference``'s pass before the
    stage holds per replica (one GPU each; the default), and what a second model beside the policy would add
    to every training GPU (LLaVA-NeXT's way)."""

    pass_per_replica: int
    """The whole model in the training precision, plus one micro-batch's forward pass without gradients (its
    logits and their float32 log-probabilities, and one block's working set)."""
    second_model_per_gpu: int
    """A second copy partitioned like the policy (ZeRO-3: its partition and a gathered layer; below ZeRO-3
    whole) plus its forward pass on every micro-batch."""


def reference_memory(setup: StageSetup) -> ReferenceMemory:
    """The reference policy's memory, precomputed or beside the policy (see ``ReferenceMemory``)."""
    wb = 4 if setup.precision == "fp32" else 2
    lm = setup.lm
    weights = wb * (lm.params + setup.tower.params + setup.projector_params)
    tokens = setup.micro_batch_size * setup.sequences_per_row * setup.max_length
    forward = tokens * lm.vocab * (wb + 4) + tokens * (4 * lm.hidden + 2 * lm.intermediate) * wb
    partition = weights // setup.world_size + wb * lm.largest_layer_params if setup.zero_stage == 3 else weights
    return ReferenceMemory(pass_per_replica=weights + forward, second_model_per_gpu=partition + forward)


@dataclass(frozen=True)
class StagePlan:
    """A stage's estimate against the GPU's memory, and the cheapest change that fits when it does not."""

    stage: str
    setup: StageSetup
    estimate: MemoryEstimate
    gpu_memory_gb: float | None
    fix: tuple[str, MemoryEstimate] | None = None
    """The first change (cheapest first) that fits, and its estimate; ``None`` when none is needed or none fits."""

    @property
    def fits(self) -> bool | None:
        if self.gpu_memory_gb is None:
            return None
        return self.estimate.total <= self.gpu_memory_gb * GB * USABLE_FRACTION

    def table(self) -> str:
        e, s = self.estimate, self.setup
        lines = [f"{self.stage}: ~{e.total / GB:.1f} GB per GPU ({e.total_params / 1e9:.2f}B parameters, "
                 f"{e.trainable_params / 1e9:.2f}B trainable; ZeRO-{s.zero_stage}"
                 f"{' + optimizer offload' if s.offload_optimizer else ''}, {s.world_size} GPUs, {s.precision}, "
                 f"micro-batch {s.micro_batch_size}{' pair(s) x 2 answers' if s.sequences_per_row == 2 else ''}"
                 f" x {s.max_length} tokens"
                 f"{', gradient checkpointing' if s.gradient_checkpointing else ''})"]
        for name, value in (("weights", e.weights), ("gradients", e.gradients), ("optimizer states", e.optimizer),
                            ("ZeRO buffers", e.buffers)):
            lines.append(f"  {name:<17}{value / GB:9.1f} GB")
        pairs = " x 2 answers" if s.sequences_per_row == 2 else ""
        lines.append(f"  {'activations':<17}{e.activations / GB:9.1f} GB  (largest micro-batch: {s.micro_batch_size}"
                     f"{pairs} x {s.max_length:,} tokens, {s.tiles_per_sample} tiles each)")
        if s.typical is not None:
            typical = replace(s, max_length=s.typical.p99_tokens, tiles_per_sample=s.typical.p99_tiles)
            lines.append(f"  {'':<17}{activation_bytes(typical) / GB:9.1f} GB  (99th percentile: "
                         f"{s.typical.p99_tokens:,} tokens, {s.typical.p99_tiles} tiles)")
        lines.append(f"  lengths from     {s.lengths_from}")
        host = host_memory(s)
        lines.append(f"  host memory      per worker: loading {host.load / GB:.1f} GB"
                     + (f", optimizer offload {host.offload / GB:.1f} GB" if host.offload else "")
                     + f"; rank 0's export {host.export / GB:.1f} GB (streamed, one shard at a time)")
        if s.sequences_per_row == 2:
            reference = reference_memory(s)
            lines.append(f"  reference        computed once before the stage (default): +0.0 GB here; the pass holds "
                         f"{reference.pass_per_replica / GB:.1f} GB per replica (the whole model and one forward "
                         f"pass). A second model beside the policy instead: "
                         f"+{reference.second_model_per_gpu / GB:.1f} GB per GPU")
        if self.gpu_memory_gb is None:
            lines.append("  verdict          no scaling.gpu_memory_gb in the recipe: nothing to check against")
        elif self.fits:
            lines.append(f"  verdict          fits in {self.gpu_memory_gb:g} GB "
                         f"({USABLE_FRACTION:.0%} usable: {self.gpu_memory_gb * USABLE_FRACTION:.0f} GB)")
        else:
            lines.append(f"  verdict          does NOT fit in {self.gpu_memory_gb:g} GB "
                         f"({USABLE_FRACTION:.0%} usable: {self.gpu_memory_gb * USABLE_FRACTION:.0f} GB)")
            lines.append(f"  cheapest fix     {self.fix[0]} (~{self.fix[1].total / GB:.1f} GB)" if self.fix else
                         "  cheapest fix     none of: gradient checkpointing, ZeRO-3, smaller micro-batch, "
                         "optimizer offload; more GPUs or a shorter model_max_length")
        return "\n".join(lines)


TEXT_ALLOWANCE = 1024
"""Text tokens beside the largest image that a shorter ``model_max_length`` must still leave room for."""


def candidate_fixes(setup: StageSetup) -> list[tuple[str, StageSetup]]:
    """Changes that cut memory, cheapest (in training speed) first; each keeps the global batch."""
    fixes = []
    if not setup.gradient_checkpointing:
        fixes.append(("deepspeed.gradient_checkpointing=true", replace(setup, gradient_checkpointing=True)))
    if setup.zero_stage < 3:
        fixes.append(("deepspeed.zero_stage=3", replace(setup, zero_stage=3)))
    micro = setup.micro_batch_size
    while micro > 1:
        micro //= 2
        fixes.append((f"micro_batch_size={micro} (more accumulation)", replace(setup, micro_batch_size=micro)))
    if not setup.offload_optimizer:
        fixes.append(("deepspeed.offload_optimizer=true", replace(setup, offload_optimizer=True)))
    length = setup.max_length
    while length // 2 >= setup.image_tokens + TEXT_ALLOWANCE:  # the data decides: longer samples are dropped
        length //= 2
        fixes.append((f"data.model_max_length={length} (samples longer than that are dropped or truncated)",
                      replace(setup, max_length=length)))
    # everything together, as a last resort
    fixes.append(("gradient checkpointing + ZeRO-3 + micro_batch_size=1 + optimizer offload",
                  replace(setup, gradient_checkpointing=True, zero_stage=3, micro_batch_size=1,
                          offload_optimizer=True)))
    return fixes


def plan(stage: str, setup: StageSetup, gpu_memory_gb: float | None) -> StagePlan:
    """The estimate, the verdict, and (when it does not fit) the first candidate fix that fits."""
    result = StagePlan(stage, setup, estimate(setup), gpu_memory_gb)
    if result.fits is not False:
        return result
    for name, changed in candidate_fixes(setup):
        candidate = estimate(changed)
        if candidate.total <= gpu_memory_gb * GB * USABLE_FRACTION:
            return replace(result, fix=(name, candidate))
    return result
