"""The trainers' and the evaluation's configurations: one dataclass each, a comment per field. Kept apart
from the trainers (which import torch) so that the CLI can build its options without loading torch."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .data.catalog import DEFAULT_DATA_DIR


def default_judge_dir() -> Path:
    """The judge shipped with the package, next to the default model."""
    return Path(__file__).resolve().parent / "weights" / "judge"


@dataclass
class UNetConfig:
    data: str  # emoji dataset folder
    vae: str  # exported VAE folder (dreamlab train vae)
    out: str  # run folder
    steps: int = 6000
    batch_size: int = 32  # per process
    lr: float = 4e-4
    warmup: int = 200
    weight_decay: float = 0.01
    min_snr_gamma: float | None = 5.0
    prediction: str = "v_prediction"
    cond_dropout: float = 0.1
    captions_per_image: int = 4  # caption variants encoded once and cycled over epochs
    # "concept": every (emoji, style) pair drawn equally often, its skin-tone variants sharing its share
    # (skin tones are 49% of the images but 5 renderings of one concept); "image": every image equally
    sampling: str = "concept"
    max_length: int = 24  # text tokens
    resolution: int = 64  # image side trained on (the emoji are 64x64; 32 = the base of a cascade)
    sr_from: int | None = None  # train a super-resolution stage from images of this side (e.g. 32) to resolution
    sr_noise_max: int = 350  # SR conditioning augmentation: noise levels (timesteps) drawn from [0, this]
    # 11.5M parameters, 0.85 GFLOP per 16x16x4 forward: sized for hours of 2-core CPU (docs/training.md)
    block_out_channels: tuple[int, ...] = (64, 128, 192)
    layers_per_block: int = 1
    attention_head_dim: int = 8
    # the pooled prompt embedding (mean of the text encoder's token states) projected and added to the
    # timestep embedding, so that every resolution sees the prompt, the 16x16 one (no cross-attention) too
    pooled_text: bool = False
    init: str | None = None  # when --out has no checkpoint: a unet or model folder to start from (a model folder continues its step count)
    # "bf16": the forward pass under bfloat16 autocast (weights, optimiser and EMA stay float32); for GPUs.
    # On this project's 2-core CPU (AVX512-BF16) it gains only 1.03x at 2 threads (benchmarks/train_step.py)
    mixed_precision: str = "no"
    ema_decay: float = 0.999  # a ~1,000-step window: runs here are thousands of steps, not hundreds of thousands
    ckpt_every: int = 200
    snapshot_every: int = 1000  # fp16 EMA model folders kept for the alignment-vs-compute curve
    sample_every: int = 1000
    log_every: int = 20
    seed: int = 0
    device: str = "auto"


@dataclass
class VAEConfig:
    data: str  # emoji dataset folder (dreamlab data emoji)
    out: str  # run folder: checkpoints, logs, plots, and the exported vae/
    steps: int = 20000
    batch_size: int = 32  # per process
    lr: float = 5e-4
    warmup: int = 200
    kl_weight: float = 1e-4
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # 3 levels: factor 4
    layers_per_block: int = 1
    latent_channels: int = 4
    init: str | None = None  # weights to start from when --out has no checkpoint (diffusers folder)
    ema_decay: float = 0.999
    ckpt_every: int = 500
    eval_every: int = 500
    log_every: int = 20
    seed: int = 0
    styles: tuple[str, ...] = ("google", "twitter")
    device: str = "auto"


@dataclass
class JudgeConfig:
    data: str
    out: str
    epochs: int = 20
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0


@dataclass
class EvalConfig:
    data: str = str(DEFAULT_DATA_DIR)  # built by `dreamlab data emoji`
    judge: str = str(default_judge_dir())
    model: str | None = None  # default: the installed default model
    run: str | None = None  # a `dreamlab train unet` run folder: score each snapshot, plot alignment vs hours
    upscaler: str | None = None  # an SR stage: score each model as the base of a cascade with it
    prompts: int = 100  # distinct held-out prompts
    per_prompt: int = 2
    steps: int = 20
    sampler: str = "dpmpp_2m"
    schedule: str | None = None  # the step grid (trailing, karras, ...); None: the model's default
    cfg_scale: float = 4.0
    seed: int = 0
    prompts_from: str = "test"  # "test": held-out renderings (the score); "train": trained ones (the gap)
    prompts_skip: int = 0  # leave out the first N prompts: tune settings on prompts the score does not use
    prompt_format: str = "{caption}"  # the prompt of each rendering, from PROMPT_FIELDS; the score's is {caption}
    controlnet: str | None = None  # score this ControlNet (fidelity, FID, top-5 over control scales) instead
    control_scales: str = "0,1"  # with --controlnet: comma-separated scales (0 = the model alone)


@dataclass
class ControlNetConfig:
    data: str  # emoji dataset folder
    out: str  # run folder
    condition: str = "canny"  # canny | shape (dreamlab.control.conditions)
    base: str | None = None  # the model to control (default: the shipped default model)
    steps: int = 6000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    cond_dropout: float = 0.5  # prompts dropped to the empty prompt (Zhang et al.: 50%)
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.995
    ckpt_every: int = 200
    snapshot_every: int = 250  # fp16 EMA ControlNets kept for the fidelity-vs-steps curve
    log_every: int = 20
    # when --out has no checkpoint: a ControlNet folder (a snapshot, an export) to continue from, its step
    # count and compute carried on (the fallback when the full checkpoints are lost)
    init: str | None = None
    seed: int = 0
    device: str = "auto"


@dataclass
class InstructConfig:
    """An instruction-editing model (InstructPix2Pix) fine-tuned from the frozen default model on the pairs
    of `dreamlab data instruct` (docs/control.md)."""

    data: str  # pairs folder (dreamlab data instruct --out)
    out: str  # run folder
    base: str | None = None  # the model it starts from (default: the shipped default model)
    name: str = "dreamlab-instruct"  # the exported model's name
    steps: int = 3000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100
    weight_decay: float = 0.0
    dropout: float = 0.05  # each of: instruction dropped, image dropped, both dropped (Brooks et al.: 5%)
    min_snr_gamma: float | None = 5.0
    ema_decay: float = 0.999
    holdout: int = 0  # every holdout-th pair (by id) is kept out of training (0: none)
    balance_kinds: bool = True  # draw each edit kind (colour, swap, tone, ...) equally often
    ckpt_every: int = 250
    snapshot_every: int = 500
    log_every: int = 20
    init: str | None = None  # when --out has no checkpoint: an exported instruction model to continue from
    seed: int = 0
    device: str = "auto"


# --- personalization (docs/personalization.md) -------------------------------------------------------


@dataclass
class EmbeddingConfig:
    """Textual inversion (Gal et al. 2022): a new token's input embedding learned on a few images."""

    images: str  # folder of 3-10 images (captions from IMAGE.txt beside each, or captions.json)
    token: str  # the new word, e.g. "<my-cat>" (must not be in the text encoder's vocabulary)
    out: str  # folder: learned_embeds.safetensors, dreamlab_embedding.json, samples.png, log
    init_word: str = "emoji"  # the embedding starts as this word's (the mean of its word pieces)
    kind: str = "object"  # object | style: which prompt templates the images are trained under
    vectors: int = 1  # embedding vectors the token stands for
    base: str | None = None  # the model (default: the shipped default model)
    steps: int = 400
    batch_size: int = 4
    lr: float = 5e-3
    min_snr_gamma: float | None = 5.0
    flip: bool = False  # random horizontal flips (off: emoji are not mirror-symmetric)
    snapshot_every: int = 0  # also save the embedding every N steps (OUT/snapshots): quality against steps
    log_every: int = 10
    samples: bool = True  # a sample grid after training
    seed: int = 0
    device: str = "auto"


@dataclass
class LoraTrainConfig:
    """LoRA (Hu et al. 2021) through peft on the UNet's attention; with a class prompt, DreamBooth (Ruiz et
    al. 2022): a rare identifier in the instance prompt plus prior preservation on class images the model
    generates itself."""

    images: str  # folder of 3-10 images (captions from IMAGE.txt beside each, or captions.json)
    instance: str  # the instance prompt, e.g. "a sks cat face"; {caption} is replaced by each image's caption
    out: str  # folder: pytorch_lora_weights.safetensors (diffusers/peft), lora.safetensors (kohya), samples.png
    class_prompt: str | None = None  # DreamBooth prior preservation, e.g. "a cat face" (--class); {caption}: per image
    class_images: int = 24  # generated once by the base model, kept in OUT/class_images
    prior_weight: float = 1.0  # lambda of the prior-preservation term
    rank: int = 8
    alpha: float | None = None  # LoRA alpha (default: the rank, so the scale is 1)
    targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # module names peft adapts (attention)
    base: str | None = None  # the model (default: the shipped default model)
    steps: int = 400
    batch_size: int = 4
    lr: float = 1e-3
    min_snr_gamma: float | None = 5.0
    flip: bool = False
    snapshot_every: int = 0  # also save the LoRA every N steps (OUT/snapshots)
    log_every: int = 10
    samples: bool = True
    seed: int = 0
    device: str = "auto"


@dataclass
class DistillConfig:
    """Few-step students of a frozen teacher (docs/distillation.md): guided consistency distillation
    (LCM, Luo et al. 2023) or guided progressive distillation (Meng et al. 2023; Salimans & Ho 2022)."""

    data: str  # emoji dataset folder (latents and captions: the UNet trainer's cache, encoded once)
    out: str  # run folder: checkpoints, log, loss.png, model/ (the student), stages/ (progressive)
    method: str = "consistency"  # consistency | progressive
    teacher: str | None = None  # the frozen teacher (default: the shipped default model)
    # consistency, when --out has no checkpoint: a student of the same teacher to continue from (its UNet;
    # a fresh optimiser, and the target network starts as it), e.g. the shipped fast or a run's snapshot
    init: str | None = None
    name: str = "fast"  # the student's model name (manifests); progressive stages add "-Nstep"
    # optimiser steps; progressive: of each stage (the guided stage, then each halving round)
    steps: int = 4000
    batch_size: int = 32
    lr: float = 1e-4
    warmup: int = 100  # (per stage for progressive: each round starts a fresh optimiser, as Salimans & Ho)
    weight_decay: float = 0.0
    cond_dropout: float = 0.1  # captions dropped to the empty prompt: the student learns G(empty, w) = x0_u too
    # the classifier-free guidance scales folded into the student's guidance input, drawn uniformly (its
    # teacher's CFG convention: 1 = no guidance); 1 inside the range keeps negative prompts possible
    guidance_min: float = 1.0
    guidance_max: float = 8.0
    guidance_dim: int = 256  # time_cond_proj_dim: width of the guidance-scale embedding (LCM's 256)
    cfg_scale: float | None = None  # the exported default (None: the teacher's default, clamped to the range)
    # consistency: the teacher's DDIM grid has solver_steps steps, i.e. its one solver step skips k = T / solver_steps
    # timesteps (LCM's skipping step: 50 -> k = 20); huber_c: pseudo-Huber's c; target_decay: EMA of the target network
    solver_steps: int = 50
    huber_c: float = 0.001
    target_decay: float = 0.95
    student_steps: int = 4  # consistency: the exported default steps (sampler lcm, trailing)
    # progressive: the first halving round distils the guided model's DDIM at this many steps into half as
    # many; rounds halve until progressive_to (16 -> 8, 4, 2, 1: four rounds after the guided stage)
    progressive_from: int = 16
    progressive_to: int = 1
    ema_decay: float = 0.999  # the exported weights
    ckpt_every: int = 200
    snapshot_every: int = 1000  # fp16 student folders in snapshots/ for the quality-vs-steps curve (0: none)
    log_every: int = 20
    samples: bool = True  # a sample grid with each export
    seed: int = 0
    device: str = "auto"
