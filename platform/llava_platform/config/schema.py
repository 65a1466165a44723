"""The typed recipe and configs: one root model per job, nested sections, a docstring per field.

Every setting and its default is written here, once (``tests/unit/config/test_one_home_per_setting.py``
holds that): the training recipe (``Recipe``), batch inference (``InferenceConfig``, ``jobs.evaluate``'s
flags take their defaults from it), the Serve application (``ServeConfig``, ``serve/config.yaml``'s
``args``) and the vLLM engine (``VllmConfig``). A recipe is resolved once on the driver (YAML +
``key.sub=value`` overrides, see ``load.py``) and validated here; below the job entrypoints nothing
reads a config object: each section's ``build()`` (or ``row_spec()``) turns it into the typed spec the
code below takes (``RowSpec``, ``VideoLimits``, ``LoraSpec``, ``VllmSettings``). Cross-field rules live
in ``Recipe.problems`` so that every mistake is reported at once, each under its dotted path.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt, model_validator

from llava_platform.archs import image_modes_for, takes_video, tiles_anyres
from llava_platform.data.packing import PackBudget, PackCost, PackingSpec
from llava_platform.data.position import ORDER_VERSION, exact_world_sizes, micro_steps
from llava_platform.data.rows import RowSpec
from llava_platform.data.video import VideoLimits
from llava_platform.generation.plan import InferencePlan
from llava_platform.model.sharded_save import SHARD_BYTES
from llava_platform.train.plan import LoraSpec
from llava_platform.train.preference import LossType, PreferenceSpec
from llava_platform.vllm_engine import VllmSettings

MAX_IMAGE_PIXELS = 50_000_000
"""The decompression-bomb guard: images (and video frames) with more pixels are refused from their header,
before decoding. The default of every image-pixel limit: training data, evaluation data, served requests."""

ONEVISION_ANYRES_MAX_TILES = 9
"""OneVision's published ``anyres_max_9`` (``model.anyres_max_tiles``'s default; vLLM runs no other)."""

Arch = Literal["llava", "llava_next", "llava_onevision"]
"""``llava``: LlavaForConditionalGeneration (LLaVA-1.5). ``llava_next``: LlavaNextForConditionalGeneration.
``llava_onevision``: LlavaOnevisionForConditionalGeneration (one image, several images, or a video)."""
Projector = Literal["linear", "mlp2x_gelu"]
ImageMode = Literal["square", "pad", "anyres"]
Template = Literal["plain", "vicuna_v1", "llama3", "mistral", "chatml", "qwen_1_5", "chatml_direct", "tokenizer"]
TunablePart = Literal["projector", "language_model", "vision_tower"]
Precision = Literal["fp32", "bf16", "fp16"]
Scheduler = Literal["cosine", "linear", "constant"]
TruncationPolicy = Literal["drop", "truncate"]
VisionFamily = Literal["clip", "siglip"]
AttentionImplementation = Literal["eager", "sdpa", "flash_attention_2"]


class Section(BaseModel):
    """Base for every recipe section: unknown keys are errors, values are immutable once resolved."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    @classmethod
    def default(cls, name: str):
        """A field's default (what a command-line flag of the same setting defaults to)."""
        return cls.model_fields[name].get_default(call_default_factory=True)

    @classmethod
    def doc(cls, name: str) -> str:
        """A field's docstring, for a command-line flag's help."""
        return " ".join((cls.model_fields[name].description or "").split())


class TinyTowers(Section):
    """Random-weight towers built from configs, for tests and the CPU demo (no downloads)."""

    vision_family: VisionFamily = "clip"
    """Which vision architecture to build (``clip``: CLS token + patches; ``siglip``: patches only)."""
    vision_hidden_size: PositiveInt = 32
    vision_layers: PositiveInt = 2
    vision_heads: PositiveInt = 2
    patch_size: PositiveInt = 14
    """ViT patch size in pixels; ``model.image_size`` must be a multiple of it."""
    vision_position_scale: PositiveFloat = 1.0
    """Scale of the vision tower's random position embeddings; 10-15 makes patch features say where
    they are, as a pretrained tower's do (see ``model/tiny.py``)."""
    text_hidden_size: PositiveInt = 32
    text_layers: PositiveInt = 2
    text_heads: PositiveInt = 2
    text_vocab_size: PositiveInt = 320
    """Byte-level BPE vocabulary size of the tiny tokenizer (256 bytes + merges + specials)."""
    text_family: Literal["llama", "mistral", "qwen2"] = "llama"
    """Which causal LM architecture to build (OneVision pairs SigLIP with ``qwen2``)."""
    seed: int = 0
    """Weights are a pure function of this seed and the sizes above."""


class ModelConfig(Section):
    """What model to train: composed from two pretrained towers, or an existing LLaVA checkpoint."""

    arch: Arch = "llava"
    """``llava`` (LLaVA-1.5, ``square``/``pad`` images) or ``llava_next`` (``anyres`` images)."""
    pretrained: str | None = None
    """An existing LLaVA(-NeXT) checkpoint in Hugging Face format (hub id, path). Excludes the towers."""
    vision_tower: str | None = None
    """Pretrained vision tower (CLIP or SigLIP; hub id or path), e.g. ``openai/clip-vit-large-patch14-336``."""
    language_model: str | None = None
    """Pretrained causal LM (hub id or path), e.g. ``lmsys/vicuna-7b-v1.5``."""
    tiny: TinyTowers | None = None
    """Build tiny random towers instead of loading pretrained ones (tests, CPU demo)."""
    projector: Projector = "mlp2x_gelu"
    """``mlp2x_gelu``: Linear-GELU-Linear (LLaVA-1.5). ``linear``: one linear map (LLaVA)."""
    vision_feature_layer: int = -2
    """Hidden layer of the vision tower whose patch features feed the projector."""
    image_size: PositiveInt = 336
    """Tile size in pixels: the vision tower's input resolution."""
    image_grid_pinpoints: list[tuple[PositiveInt, PositiveInt]] | None = None
    """``anyres`` candidate resolutions as (height, width); multiples of ``image_size``."""
    anyres_max_tiles: PositiveInt | None = None
    """``llava_onevision`` only: ``anyres_max_<N>``, the lone image's grid features are scaled down to about
    N tiles' worth when larger; ``None``: ``ONEVISION_ANYRES_MAX_TILES`` (``max_tiles()`` resolves it)."""
    attn_implementation: AttentionImplementation = "sdpa"
    """transformers' attention kernel for training and serving: ``sdpa`` (PyTorch's, everywhere),
    ``flash_attention_2`` (GPUs with the ``flash-attn`` package installed), ``eager``."""

    def max_tiles(self) -> int | None:
        """N of OneVision's ``anyres_max_N`` for this arch (``None`` for the archs without it)."""
        return (self.anyres_max_tiles or ONEVISION_ANYRES_MAX_TILES) if takes_video(self.arch) else None


class LoraConfig(Section):
    """LoRA adapters on the language model (via peft); the projector stays fully trained."""

    r: PositiveInt = 128
    alpha: PositiveInt = 256
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    """Module names inside the language model that receive adapters."""

    def build(self) -> LoraSpec:
        return LoraSpec(r=self.r, alpha=self.alpha, dropout=self.dropout, target_modules=tuple(self.target_modules))


class VideoConfig(Section):
    """How a record's ``video`` becomes frames (``llava_onevision``), and what a video may be."""

    frames: PositiveInt = 8
    """Frames sampled uniformly over the whole video (the first and last included). Every video gets
    exactly this many, so that a batch's videos stack (a video with fewer frames repeats some)."""
    max_duration_s: PositiveFloat = 600.0
    """Longer videos are quarantined (``video_too_long``) before any frame is decoded."""
    max_source_frames: PositiveInt = 100_000
    """Videos whose stream holds more frames are quarantined (``too_many_frames``): seeking through
    them is the cost, whatever the sample count."""
    max_bytes: PositiveInt = 200_000_000
    """Larger video files are quarantined (``video_too_large``) before decoding."""

    def build(self, max_frame_pixels: int) -> VideoLimits:
        """The limits a video is sampled under; frames obey the images' pixel guard."""
        return VideoLimits(frames=self.frames, max_duration_s=self.max_duration_s,
                           max_source_frames=self.max_source_frames, max_bytes=self.max_bytes,
                           max_frame_pixels=max_frame_pixels)


class PackingConfig(Section):
    """Several samples, with their images, in one training row (preprocessed stages; ``data.packing``)."""

    max_tokens: PositiveInt
    """Tokens per pack (its row length), image tokens included; at least ``model_max_length`` (a sample is
    never split)."""
    max_tiles: PositiveInt | None = None
    """Tiles and video frames per pack (what the vision tower runs at once); ``None``: no limit."""
    window: PositiveInt = 1024
    """Rows of the epoch's order packed together (best-fit decreasing inside each window)."""

    def build(self, cost: PackCost) -> PackingSpec:
        return PackingSpec(budget=PackBudget(self.max_tokens, self.max_tiles), window=self.window, cost=cost)


class DataConfig(Section):
    """Where a stage's samples come from and how they become tokens and tiles."""

    train_files: list[str] = Field(min_length=1)
    """LLaVA-format JSON/JSONL or Parquet files (paths or ``s3://`` URIs)."""
    image_root: str | None = None
    """Folder or ``s3://`` prefix that the records' relative ``image`` paths start from."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for ``s3://`` paths (MinIO, Ceph); default: ``AWS_ENDPOINT_URL`` or AWS."""
    template: Template = "vicuna_v1"
    """Conversation template; ``plain`` for stage-1 captioning, ``tokenizer`` uses the LM's own."""
    image_mode: ImageMode = "pad"
    """``square`` (resize + centre crop), ``pad`` (LLaVA-1.5) or ``anyres`` (LLaVA-NeXT)."""
    model_max_length: PositiveInt = 2048
    """Longest sequence in tokens, image tokens included."""
    truncation: TruncationPolicy = "drop"
    """Over-long samples: ``drop`` quarantines them, ``truncate`` cuts text (never an image)."""
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    """Refuse images with more pixels than this before decoding (decompression-bomb guard)."""
    max_images: PositiveInt = 16
    """``llava_onevision``: records with more images than this are quarantined (``too_many_images``)."""
    video: VideoConfig = VideoConfig()
    """``llava_onevision``: frame sampling and limits for records with a ``video``."""
    group_by_modality_length: bool = True
    """Batch samples of similar length and the same modality together to cut padding."""
    packing: PackingConfig | None = None
    """Pack several samples into each training row (``llava_platform.data.packing``): no padding but a
    pack's end. The global and micro batch then count packs. Preprocessed stages only; replaces
    ``group_by_modality_length`` (set it false)."""
    preprocessed: str | None = None
    """A folder written by ``jobs.preprocess`` for these settings: training reads its rows by id from the
    Parquet shards, in one global order per epoch (``data.position``), instead of preprocessing on the
    fly (checked against the manifest's fingerprint). Every row then trains once per epoch, in the same
    global batches, on any worker count and across resizes; elastic training needs it."""
    shuffle_row_groups: PositiveInt = 64
    """Preprocessed stages: row groups (``pipelines.shards.ROWS_PER_ROW_GROUP`` rows each) whose rows are
    shuffled together each epoch (``RowOrder.window_blocks``); each worker keeps as many in memory."""
    materialize: bool = False
    """Streamed stages: keep each worker's rows in Ray's object store after one read
    (``Dataset.materialize``), so that later epochs replay them instead of reading (and preprocessing)
    again. For stages whose rows fit in the object store and that run several epochs: every epoch
    boundary otherwise restarts the reading, which costs seconds of CPU while training waits or shares
    the cores. (Preprocessed stages read their rows by id from the shards.)"""

    def order_version(self) -> str:
        """The epoch-order rule of a preprocessed stage, its shuffle window and packing included (``DataPosition``)."""
        packing = self.packing
        packs = f"/packs{packing.max_tokens}x{packing.max_tiles}w{packing.window}" if packing else ""
        return f"{ORDER_VERSION}/window{self.shuffle_row_groups}{packs}"

    def row_spec(self) -> RowSpec:
        """The settings that shape a training row, for the pipeline and the row builder."""
        return RowSpec(template=self.template, image_mode=self.image_mode, max_length=self.model_max_length,
                       truncation=self.truncation, max_image_pixels=self.max_image_pixels,
                       image_root=self.image_root, s3_endpoint_url=self.s3_endpoint_url,
                       max_images=self.max_images, video=self.video.build(self.max_image_pixels))


class OptimConfig(Section):
    """AdamW with a warmup + decay schedule and per-part learning rates."""

    lr: PositiveFloat
    """Learning rate of the language model (and of everything without its own rate)."""
    projector_lr: PositiveFloat | None = None
    """Learning rate of the projector; defaults to ``lr``."""
    vision_tower_lr: PositiveFloat | None = None
    """Learning rate of the vision tower when it is tunable; defaults to ``lr``."""
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    scheduler: Scheduler = "cosine"
    max_grad_norm: PositiveFloat = 1.0


class DeepSpeedConfig(Section):
    """Engine settings; turned into a DeepSpeed config dict by the training builder."""

    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    precision: Precision = "bf16"
    """``bf16`` on GPUs; ``fp32`` on CPU."""
    gradient_checkpointing: bool = False
    tf32: bool = False
    """Let float32 matmuls and convolutions use TF32 tensor cores (Ampere and newer GPUs; no effect on CPU)."""
    zero3_param_persistence_threshold: int = Field(100_000, ge=0)
    """ZeRO-3 keeps parameters with fewer elements than this whole on every rank (DeepSpeed's default);
    0 shards everything."""


class StageConfig(Section):
    """One training stage. Stage 1 and stage 2 are the same loop with different data here."""

    data: DataConfig
    tunable: list[TunablePart] = Field(min_length=1)
    """Parts whose weights train; everything else is frozen."""
    lora: LoraConfig | None = None
    """Train LoRA adapters on the language model instead of its full weights."""
    init_from: str | None = None
    """Projector to start from: ``stage1`` (this recipe's stage 1), a path, or an MLflow ``runs:/`` URI."""
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    """Stop after this many optimizer steps (demos, smoke tests); ``None`` runs all epochs."""
    global_batch_size: PositiveInt
    """Samples per optimizer step across all workers."""
    micro_batch_size: PositiveInt
    """Samples per forward pass on one worker."""
    loss: Literal["token_mean", "micro_batch_mean"] = "token_mean"
    """``token_mean``: the cross-entropy summed over every supervised token of the global batch (all ranks,
    all micro-steps), divided by their count (transformers' ``num_items_in_batch``): each token weighs
    the same. ``micro_batch_mean``: each micro-batch's own mean, averaged (LLaVA's original trainer, where
    a micro-batch of short answers weighs as much as one of long descriptions; for parity runs)."""
    pad_micro_batches: bool = False
    """Allow a global batch that does not split into whole micro-batches on every worker count the run may
    have (``scaling.min_workers`` .. ``num_workers``): the last micro-steps of each step then run filler
    rows with weight 0 (compute spent, updates exact). Without it the recipe check refuses such a batch."""
    optim: OptimConfig
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()

    def gradient_accumulation_steps(self, num_workers: int) -> int:
        """Micro-batches per optimizer step on each of ``num_workers`` workers (``data.position.micro_steps``)."""
        return micro_steps(self.global_batch_size, self.micro_batch_size, num_workers)


class PreferenceConfig(Section):
    """The preference loss of stage 3 (``train.preference``: LLaVA-NeXT's ``train_dpo.py``), and the pass that
    computes the frozen reference policy's log-probabilities before training (``pipelines.reference``)."""

    beta: PositiveFloat = 0.1
    """How far the policy may move from the reference: the log-ratio's scale in the loss (``dpo_ov7b.sh``: 0.1)."""
    dpo_alpha: float = Field(1.0, ge=0.0)
    """Weight of the preference term (``dpo_ov7b.sh``: 1.0)."""
    gamma: float = Field(0.0, ge=0.0)
    """Weight of the SFT term, the chosen answers' token-mean cross-entropy (``dpo_ov7b.sh``: 0)."""
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    """``sigmoid`` only: the assumed share of flipped preferences (conservative DPO); 0 is plain DPO."""
    loss_type: LossType = "sigmoid"
    """``sigmoid`` (DPO), ``ipo`` (per-token mean log-probabilities, squared loss) or ``hinge``."""
    reference_replicas: PositiveInt = 1
    """Model replicas (Ray Data actors) of the reference pass; each takes one GPU with ``scaling.use_gpu``."""
    reference_pairs_per_call: PositiveInt = 4
    """Pairs per forward pass of the reference (two sequences each)."""

    def build(self) -> PreferenceSpec:
        return PreferenceSpec(beta=self.beta, dpo_alpha=self.dpo_alpha, gamma=self.gamma,
                              label_smoothing=self.label_smoothing, loss_type=self.loss_type)


class PreferenceStageConfig(StageConfig):
    """Stage 3: preference tuning (DPO) of the instruction-tuned model, as LLaVA-NeXT's ``train_dpo.py``.

    Its data are preference records (``data.preference``); ``jobs.train`` preprocesses them into
    ``data.preprocessed`` (one tiling per pair) and runs the frozen starting model once over them
    (``pipelines.reference``) before the stage, so a step needs no second model.
    """

    init_from: str | None = "stage2"
    """The starting policy, which is also the frozen reference: ``stage2`` (this recipe's stage-2 export), a
    Hugging Face export folder, or ``None`` (``--model`` itself, e.g. a published OneVision checkpoint)."""
    loss: Literal["pair_mean"] = "pair_mean"
    """Every pair of the global batch weighs the same: each micro-batch's mean over its pairs, averaged
    (micro-batches are of equal size; padding slots weigh 0), as LLaVA-NeXT's trainer."""
    preference: PreferenceConfig = PreferenceConfig()


class ScalingConfig(Section):
    """How many Ray Train workers and what each one gets."""

    num_workers: PositiveInt = 1
    min_workers: PositiveInt | None = None
    """Elastic training (Ray Train's ``ScalingConfig(num_workers=(min_workers, num_workers))``): the run
    starts with as many workers as the cluster has room for, at least ``min_workers``, and when a node is
    lost and no replacement comes, it goes on from its latest checkpoint with the workers that remain
    (more join again when nodes do, checked every ``elastic_resize_interval_s``). The rows, their order
    and the global batches stay those of the full-size run (preprocessed stages only; accumulation absorbs
    the count). ``None``: a fixed worker count."""

    def world_sizes(self) -> range:
        """The worker counts a run may have: ``min_workers .. num_workers`` (elastic), else ``num_workers``."""
        return range(self.min_workers or self.num_workers, self.num_workers + 1)
    elastic_resize_interval_s: PositiveFloat = 60.0
    """Elastic only: how often a healthy run checks whether more workers fit (a resize restarts it from
    its latest checkpoint)."""
    use_gpu: bool = False
    cpus_per_worker: PositiveFloat = 1.0
    gpus_per_worker: float = Field(1.0, ge=0.0)
    """GPUs per worker when ``use_gpu`` (usually 1)."""
    gpu_memory_gb: PositiveFloat | None = None
    """Memory of each GPU (e.g. 80 for A100/H100 80 GB): ``--dry-run`` checks each stage's estimated
    per-GPU memory against it (``llava_platform.train.memory``)."""
    gpu_preflight: bool = True
    """With ``use_gpu``, fail before any worker starts if the cluster has no GPUs. Turn off on an
    autoscaling cluster whose GPU nodes only start on demand."""
    data_cpus_per_actor: PositiveFloat = 1.0
    """Logical CPUs per Ray Data preprocessing actor and read task. Below 1 on a single small machine:
    Ray Train leaves Ray Data only the CPUs its workers do not reserve."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """How the workers' placement group puts them on nodes, and so what a lost node means: with
    ``PACK`` or ``SPREAD`` the restarted workers go wherever there is room (the run goes on, on the
    remaining nodes); with ``STRICT_SPREAD`` (one worker per node) a lost node leaves too few
    nodes, and the run waits, from its latest checkpoint, until a replacement node joins."""


class TrackingConfig(Section):
    """Where MLflow records the runs and under which name the result is registered."""

    uri: str | None = None
    """MLflow tracking URI (``http://mlflow:5000``). Default: ``MLFLOW_TRACKING_URI``, else
    ``sqlite:///<working dir>/mlflow.db`` (no server needed)."""
    experiment: str | None = None
    """MLflow experiment; default: the recipe's ``name``."""
    registered_model: str | None = None
    """Model Registry name of the stage-2 and stage-3 exports (a new version each per run); default: the recipe's
    ``name``."""
    system_metrics: bool = True
    """Sample CPU/GPU/memory/network on the rank-0 worker into the stage's run."""
    system_metrics_interval_s: PositiveFloat = 10.0
    """Seconds between system-metric samples."""


class CheckpointConfig(Section):
    """Periodic full training state (DeepSpeed weights, optimizer, scheduler, data position) and auto-resume."""

    every_n_steps: PositiveInt = 200
    """Optimizer steps between checkpoints (the last step always gets one)."""
    upload: Literal["async", "sync"] = "async"
    """``async``: training goes on while each rank's part uploads in the background (Ray Train's
    ``CheckpointUploadMode.ASYNC``; a checkpoint counts once every rank's upload has finished).
    ``sync``: the step waits for the upload."""
    num_to_keep: PositiveInt = 2
    """Checkpoints kept per stage; older ones are deleted."""
    storage_path: str | None = None
    """Folder or ``s3://`` prefix for checkpoints, shared by all nodes; default: ``<output>/checkpoints``."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for an ``s3://`` ``storage_path``; default: ``AWS_ENDPOINT_URL`` or AWS."""
    max_failures: int = Field(3, ge=-1)
    """Worker-group restarts from the latest checkpoint before the run fails (-1: unlimited)."""
    export_shard_mb: PositiveInt = SHARD_BYTES // 2**20
    """Largest safetensors file of the Hugging Face export. The export streams one shard at a time (gathered,
    written, released), so this is also the most weight memory the exporting host holds."""


class SyntheticDataConfig(Section):
    """Write the synthetic coloured-shapes dataset before anything else (the CPU demo; see ``data/synthetic.py``)."""

    out_dir: str
    """Folder for ``stage1.json``, ``stage2.jsonl``, ``eval.jsonl`` and ``images/``; the stages' data point here.
    Kept between runs: a folder written with the same settings and seed is reused."""
    train_records: PositiveInt = 1000
    """Stage-2 question records, one image each."""
    caption_records: PositiveInt | None = None
    """Stage-1 caption records, on the first training images (default: one per training image)."""
    eval_records: PositiveInt = 100
    """Held-out questions on new images, half short-answer, half multiple-choice."""
    onevision_frames: PositiveInt | None = None
    """``llava_onevision`` recipes: questions on one image, two images and a video in turn (videos sampled
    to this many frames: set it to the stages' ``data.video.frames``); ``None``: single-image questions."""


class VllmConfig(Section):
    """The vLLM engine (``engine: vllm``): how it runs. ``build()`` gives the ``VllmSettings`` its actor takes."""

    max_model_len: PositiveInt | None = None
    """Context the KV cache is sized for (default: the checkpoint's)."""
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    """Share of the GPU's memory for weights and KV cache (ignored when ``kv_cache_memory_bytes`` is set)."""
    kv_cache_memory_bytes: PositiveInt | None = None
    """A fixed KV cache size; ``None``: ``gpu_memory_utilization`` on GPUs, ``CPU_KV_CACHE_BYTES`` (1 GiB) on CPUs."""
    max_num_seqs: PositiveInt = 256
    """Sequences batched together at most (continuous batching)."""
    max_lora_rank: PositiveInt | None = None
    """LoRA adapters served unmerged up to this rank (``None``: no LoRA, or the served adapters' own rank)."""
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    """No CUDA graphs / torch.compile: starts in seconds instead of a minute (tests, CPU)."""
    in_process: bool = False
    """Run the engine core in the actor's own process (``VLLM_ENABLE_V1_MULTIPROCESSING=0``): one process
    less per engine; the default (a separate engine-core process) overlaps scheduling with the forward pass."""
    python: str | None = None
    """The engine environment's interpreter; ``None``: ``$LLAVA_VLLM_PYTHON``, else the checkout's ``.venv-vllm/``."""
    num_cpus: PositiveFloat = 1.0
    num_gpus: float = Field(0.0, ge=0.0)
    env: dict[str, str] = {}
    """Extra environment variables for the engine process (e.g. ``VLLM_CPU_OMP_THREADS_BIND``)."""

    def build(self, dtype: str) -> VllmSettings:
        """The engine's settings; ``dtype`` is the deployment's (``ServeConfig.dtype``, ``InferenceConfig.dtype``)."""
        return VllmSettings(dtype=dtype, **self.model_dump())


Engine = Literal["transformers", "vllm"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]
"""An engine's dtype (``generation.engine.resolve_dtype``)."""
"""What generates: ``transformers`` (``model.generate`` in static batches) or ``vllm`` (continuous batching)."""


class InferenceConfig(Section):
    """How batch inference answers questions (``jobs.evaluate``: its flags default to these)."""

    engine: Engine = "transformers"
    """``transformers`` in each replica, or a vLLM engine per replica (its own environment, ``make vllm``)."""
    dtype: Dtype = "auto"
    """What either engine runs the checkpoint in: ``auto`` is the checkpoint's own (``config.json``)."""
    vllm: VllmConfig = VllmConfig()
    """The vLLM engine's settings (resources come from ``cpus_per_replica``/``gpus_per_replica``)."""
    max_new_tokens: PositiveInt = 16
    """Answer length cap (short answers and option letters need few)."""
    batch_size: PositiveInt = 16
    """Questions per ``generate`` call."""
    num_replicas: PositiveInt = 1
    """Model replicas (Ray Data actors) answering in parallel."""
    cpus_per_replica: PositiveFloat = 1.0
    gpus_per_replica: float = Field(0.0, ge=0.0)
    """0: CPU replicas; 1 puts each replica on its own GPU."""
    video_frames: PositiveInt = 8
    """Frames sampled per video record (OneVision): the count the model trained with (``data.video.frames``)."""
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    """Images (and video frames) with more pixels are quarantined from their header, before decoding."""

    def build(self) -> InferencePlan:
        return InferencePlan(
            engine=self.engine, dtype=self.dtype, vllm=self.vllm.build(self.dtype), max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size, num_replicas=self.num_replicas, cpus_per_replica=self.cpus_per_replica,
            gpus_per_replica=self.gpus_per_replica, max_image_pixels=self.max_image_pixels,
            video=VideoConfig(frames=self.video_frames).build(self.max_image_pixels))


class EvaluationConfig(InferenceConfig):
    """The held-out evaluation that ``jobs.pipeline`` runs after training (through ``jobs.evaluate``)."""

    data_files: list[str] = Field(min_length=1)
    """LLaVA-format evaluation files with gold ``answer`` and ``type`` (``short`` or ``mc``) per record."""
    image_root: str | None = None
    """Folder or ``s3://`` prefix of the records' relative image paths."""
    score_stage1: bool = True
    """Also score the stage-1 model (starting checkpoint + aligned projector), to show what stage 2 adds."""
    preference_files: list[str] = []
    """Held-out preference records (``data.preference``) on which a stage-3 run's aligned model is compared with
    its reference (``pipelines.reference.preference_accuracy``); images under ``image_root``."""

    def inference(self) -> InferenceConfig:
        """The batch-inference settings alone."""
        return InferenceConfig(**{name: getattr(self, name) for name in InferenceConfig.model_fields})


class ServeLimits(Section):
    """What one request to the endpoint may ask for (``serve/config.yaml``'s ``args.limits``)."""

    max_tokens: PositiveInt = 256
    """Cap on ``max_tokens``; also the default when a request gives none."""
    max_images: PositiveInt = 4
    max_image_bytes: PositiveInt = 10_000_000
    max_image_pixels: PositiveInt = MAX_IMAGE_PIXELS
    max_image_aspect_ratio: PositiveFloat = 20.0
    """Longer side / shorter side; beyond it an image is refused from its header, before decoding."""
    allowed_image_hosts: tuple[str, ...] = ()
    """``http(s)`` image URLs are refused unless their host is listed here (then fetched with a timeout,
    no redirects and the byte limit); ``data:`` URLs always work."""
    max_videos: PositiveInt = 1
    """``video_url`` parts per request (OneVision models; a model without video refuses any)."""
    max_video_bytes: PositiveInt = 50_000_000
    max_video_duration_s: PositiveFloat = 120.0
    max_video_frames: PositiveInt = 10_000
    """Frames in the video's stream: a video with more is refused from its header, before decoding."""
    video_frames: PositiveInt = 8
    """Frames sampled from each video, uniformly: the count the model trained with (``data.video.frames``)."""
    allowed_video_hosts: tuple[str, ...] = ()
    """As ``allowed_image_hosts``, for ``video_url`` parts."""

    def video_limits(self) -> VideoLimits:
        """The limits a request's video is sampled under."""
        return VideoConfig(frames=self.video_frames, max_duration_s=self.max_video_duration_s,
                           max_source_frames=self.max_video_frames, max_bytes=self.max_video_bytes,
                           ).build(self.max_image_pixels)


class ServeConfig(Section):
    """The Serve application's ``args`` (``serve/config.yaml``; ``jobs.deploy`` replaces a few)."""

    model: str
    """The checkpoint: a folder, ``s3://...``, ``models:/<name>/<version|@alias>``, ``runs:/<id>/<path>``."""
    model_name: str | None = None
    """What clients send as ``model`` (default: ``model``)."""
    device: str = "cpu"
    """``cpu`` or ``cuda`` (the transformers engine; vLLM's resources are ``vllm.num_gpus``)."""
    dtype: Dtype = "auto"
    """What either engine runs the checkpoint in: ``auto`` is the checkpoint's own (``config.json``), so both
    engines answer alike out of the box; ``float32``, ``bfloat16``, ``float16`` convert it."""
    api_key: str | None = None
    """Clients must send ``Authorization: Bearer <key>``; default: ``$LLAVA_SERVE_API_KEY``, else none."""
    limits: ServeLimits = ServeLimits()
    engine: Engine = "transformers"
    """What generates: static batches of ``max_batch_size`` (``transformers``), or an engine actor per replica
    that batches continuously (``vllm``, in ``.venv-vllm/`` or ``$LLAVA_VLLM_PYTHON``)."""
    vllm: VllmConfig = VllmConfig()
    lora_adapters: dict[str, str] = {}
    """``engine: vllm`` only: peft LoRA adapters served unmerged, each under its own model name, on ``model`` (a
    LoRA run's ``<stage>/adapter_base``)."""
    max_batch_size: PositiveInt = 8
    """Requests queued together for one ``generate`` (an engine that batches continuously takes them one by one)."""
    batch_wait_timeout_s: float = Field(0.05, ge=0.0)
    """How long the first request of a batch waits for more."""
    tracking_uri: str | None = None
    """MLflow for ``models:/`` and ``runs:/`` URIs (default: ``MLFLOW_TRACKING_URI``)."""
    s3_endpoint_url: str | None = None
    """S3-compatible endpoint for ``s3://`` models (default: ``AWS_ENDPOINT_URL`` or AWS)."""
    cache_dir: str | None = None
    """Where downloaded checkpoints are kept (default: ``<temp>/llava-serve-cache``)."""

    @model_validator(mode="after")
    def _adapters_need_vllm(self) -> ServeConfig:
        if self.lora_adapters and self.engine != "vllm":
            raise ValueError("lora_adapters: unmerged LoRA adapters are served by the vllm engine only "
                             "(set engine: vllm, or serve the merged export)")
        return self


class Recipe(Section):
    """The root of a training recipe: model, up to two stages, and the cluster shape."""

    name: str
    seed: int = 42
    model: ModelConfig
    stage1: StageConfig | None = None
    """Projector alignment: vision tower and language model frozen."""
    stage2: StageConfig | None = None
    """Instruction tuning: projector + the parts in ``tunable`` (or LoRA)."""
    stage3: PreferenceStageConfig | None = None
    """Preference tuning (DPO) of the stage-2 model on preference pairs."""
    scaling: ScalingConfig = ScalingConfig()
    tracking: TrackingConfig = TrackingConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    synthetic: SyntheticDataConfig | None = None
    """Generate the synthetic dataset first (demo recipes)."""
    evaluation: EvaluationConfig | None = None
    """Score the trained model on held-out questions at the end of ``jobs.pipeline``."""

    def stages(self) -> dict[str, StageConfig]:
        """The stages present, in run order, keyed by their recipe name (``stage1``, ``stage2``, ``stage3``)."""
        return {name: stage for name, stage in (("stage1", self.stage1), ("stage2", self.stage2),
                                                ("stage3", self.stage3)) if stage}

    def problems(self) -> list[str]:
        """Every cross-field inconsistency, as ``dotted.path: what is wrong and what to do``."""
        found: list[str] = []
        found += _model_problems(self.model)
        if not self.stages():
            found.append("stage1/stage2/stage3: a recipe needs at least one stage")
        for name, stage in self.stages().items():
            found += _stage_problems(name, stage, self.model, self.scaling, has_stage1=self.stage1 is not None)
        if self.stage3 is not None:
            found += _preference_problems(self.stage3, has_stage2=self.stage2 is not None)
        found += _scaling_problems(self.scaling)
        return found


def _preference_problems(stage: PreferenceStageConfig, has_stage2: bool) -> list[str]:
    """Stage 3 starts from a whole model and reads preprocessed pairs with their reference log-probabilities."""
    found = []
    if stage.init_from == "stage2" and not has_stage2:
        found.append("stage3.init_from: 'stage2' needs a stage2 section; give an export folder, or null to start "
                     "from --model")
    if stage.init_from == "stage1":
        found.append("stage3.init_from: stage 3 starts from a whole model: 'stage2', an export folder, or null "
                     "(--model)")
    if stage.data.preprocessed is None:
        found.append("stage3.data.preprocessed: the reference log-probabilities are computed once over the "
                     "preprocessed pairs; name a folder (jobs.train writes it before the stage)")
    if stage.data.packing is not None:
        found.append("stage3.data.packing: a preference row holds one pair (two answers on one tiling); remove "
                     "packing")
    if stage.data.truncation != "drop":
        found.append("stage3.data.truncation: a truncated answer is another answer; pairs that are too long are "
                     "quarantined (set drop)")
    return found


def _scaling_problems(scaling: ScalingConfig) -> list[str]:
    found = []
    if scaling.min_workers is not None:
        if scaling.min_workers > scaling.num_workers:
            found.append(f"scaling.min_workers: {scaling.min_workers} is above scaling.num_workers "
                         f"{scaling.num_workers} (elastic runs use between min_workers and num_workers)")
        if scaling.placement_strategy == "STRICT_SPREAD":
            # Ray Train's elastic policy counts workers by each node's resources, not by nodes: with
            # room for two workers on one node it restarts two, a placement group STRICT_SPREAD never places.
            found.append("scaling.placement_strategy: STRICT_SPREAD cannot be elastic (scaling.min_workers): "
                         "Ray Train sizes an elastic group by resources, not nodes; use PACK or SPREAD")
    return found


def _batch_problems(name: str, stage: StageConfig, scaling: ScalingConfig) -> list[str]:
    """The global batch splits the same way on every worker count the run may have; elastic needs rows by id."""
    batch, micro, sizes = stage.global_batch_size, stage.micro_batch_size, scaling.world_sizes()
    if batch % micro:
        return [f"{name}.global_batch_size: {batch} is not a whole number of micro-batches of {micro} "
                f"({name}.micro_batch_size)"]
    found = []
    exact = exact_world_sizes(batch, micro, sizes)
    inexact = [w for w in sizes if w not in exact]
    if inexact and not stage.pad_micro_batches:
        step = micro * math.lcm(*sizes)
        found.append(
            f"{name}.global_batch_size: {batch} rows in micro-batches of {micro} do not split evenly among "
            f"{_counts(inexact)} workers (exact on {_counts(exact) if exact else 'none'} of {_counts(list(sizes))}); "
            f"use a multiple of {step} (e.g. {-(-batch // step) * step}), narrow scaling.min_workers, or set "
            f"{name}.pad_micro_batches: true (filler rows with weight 0 in the last micro-steps)")
    if scaling.min_workers is not None and stage.data.preprocessed is None:
        found.append(f"{name}.data.preprocessed: elastic training (scaling.min_workers) reads rows by id from "
                     "preprocessed shards, so that every row trains once per epoch on any worker count; write them "
                     f"with `python -m jobs.preprocess --stage {name[-1]}` (jobs.pipeline does) and set "
                     f"{name}.data.preprocessed, or remove scaling.min_workers")
    packing = stage.data.packing
    if packing is not None:
        if stage.data.preprocessed is None:
            found.append(f"{name}.data.packing: packs are planned from the exact lengths of preprocessed rows; "
                         f"set {name}.data.preprocessed (jobs.preprocess writes it)")
        if stage.data.group_by_modality_length:
            found.append(f"{name}.data.group_by_modality_length: packing fills rows with samples of any modality and "
                         "length; set it false")
        if packing.max_tokens < stage.data.model_max_length:
            found.append(f"{name}.data.packing.max_tokens: {packing.max_tokens} is below {name}.data.model_max_length "
                         f"{stage.data.model_max_length}: the longest samples would fit no pack")
    if stage.data.materialize and stage.data.preprocessed is not None:
        found.append(f"{name}.data.materialize: preprocessed stages read their rows by id from the shards; "
                     "remove materialize (it keeps a streamed stage's rows in the object store)")
    return found


def _counts(sizes: list[int]) -> str:
    return ", ".join(map(str, sizes))


def _model_problems(model: ModelConfig) -> list[str]:
    found = []
    sources = {
        "pretrained": model.pretrained is not None,
        "vision_tower+language_model": model.vision_tower is not None or model.language_model is not None,
        "tiny": model.tiny is not None,
    }
    if sum(sources.values()) != 1:
        found.append(
            "model: set exactly one model source: `pretrained`, or `vision_tower` and `language_model`, "
            f"or `tiny` (set now: {[k for k, v in sources.items() if v] or 'none'})"
        )
    if (model.vision_tower is None) != (model.language_model is None):
        found.append("model.vision_tower/model.language_model: composing a model needs both towers")
    if model.tiny is not None and model.image_size % model.tiny.patch_size:
        found.append(
            f"model.image_size: {model.image_size} is not a multiple of model.tiny.patch_size "
            f"{model.tiny.patch_size}"
        )
    if tiles_anyres(model.arch):
        if not model.image_grid_pinpoints:
            found.append(f"model.image_grid_pinpoints: {model.arch} needs anyres pinpoints, e.g. [[336, 672], ...]")
        for i, (height, width) in enumerate(model.image_grid_pinpoints or []):
            if height % model.image_size or width % model.image_size:
                found.append(
                    f"model.image_grid_pinpoints.{i}: ({height}, {width}) is not a multiple of "
                    f"model.image_size {model.image_size}"
                )
    elif model.image_grid_pinpoints:
        found.append("model.image_grid_pinpoints: only used by archs llava_next and llava_onevision; remove it or "
                     "set model.arch")
    if model.anyres_max_tiles is not None and not takes_video(model.arch):
        found.append("model.anyres_max_tiles: only used by arch llava_onevision; remove it or set model.arch")
    return found


def _stage_problems(
    name: str, stage: StageConfig, model: ModelConfig, scaling: ScalingConfig, has_stage1: bool
) -> list[str]:
    found = []
    allowed_modes = image_modes_for(model.arch)
    if stage.data.image_mode not in allowed_modes:
        found.append(
            f"{name}.data.image_mode: {stage.data.image_mode!r} does not fit model.arch {model.arch!r}; "
            f"allowed: {', '.join(allowed_modes)}"
        )
    if stage.deepspeed.precision != "fp32" and not scaling.use_gpu:
        found.append(
            f"{name}.deepspeed.precision: {stage.deepspeed.precision} needs GPUs (scaling.use_gpu: true); "
            "use fp32 on CPU"
        )
    found += _batch_problems(name, stage, scaling)
    if name == "stage1":
        if sorted(stage.tunable) != ["projector"] or stage.lora is not None:
            found.append("stage1.tunable: stage 1 aligns the projector only; set tunable: [projector], no lora")
        if stage.init_from == "stage1":
            found.append("stage1.init_from: stage 1 cannot start from itself")
    if stage.lora is not None:
        if "language_model" in stage.tunable:
            found.append(
                f"{name}.tunable: with {name}.lora the language model trains through adapters; "
                "remove language_model from tunable"
            )
        if "projector" not in stage.tunable:
            found.append(f"{name}.tunable: LoRA recipes train the projector fully; add projector")
    if stage.optim.vision_tower_lr is not None and "vision_tower" not in stage.tunable:
        found.append(f"{name}.optim.vision_tower_lr: set, but vision_tower is not in {name}.tunable")
    if stage.init_from == "stage1" and not has_stage1 and name != "stage3":
        found.append(f"{name}.init_from: 'stage1' needs a stage1 section; give a path or runs:/ URI instead")
    return found

