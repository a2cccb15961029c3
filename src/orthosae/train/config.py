"""The training config. Each field's docstring is its `orthosae train --help` text."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal

from orthosae.errors import UserError
from orthosae.orthogonality import COACTIVATIONS, METHODS


@dataclass
class TrainConfig:
    # --- data -------------------------------------------------------------------------------------
    activations: str | None = None
    """Activations to train on: a .npy or .safetensors file of shape (N, d), or a cache directory."""
    model: str | None = None
    """Language model to harvest from on the fly (streaming, no cache): 'smollm2-135m', a hub id or a dir."""
    layer: int | None = None
    """Decoder block whose output (resid_post) is harvested when --model is given (0-based)."""
    tokens: int | None = None
    """Tokens to harvest when streaming from --model (accepts 2M, 500k); default steps × batch size."""
    corpus: str = "bundled"
    """Text to harvest from when streaming: 'bundled', a .txt/.jsonl/.parquet file, or a dataset id."""
    context_size: int = 128
    """Tokens per context when streaming (BOS included)."""
    remove_high_norm: float = 10.0
    """When streaming: drop tokens whose norm exceeds this multiple of the batch median; 0 keeps all."""
    model_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """When streaming: the dtype --model runs in (bfloat16 halves its memory and speeds it up on recent
    hardware); the SAE always receives float32 activations."""
    model_device_map: str = "none"
    """When streaming, one process only: spread --model over the visible GPUs (and CPU) with transformers'
    device_map, for a model too large for one GPU: auto, balanced, balanced_low_0, sequential, one device
    (cuda:1) or a JSON object of module → device ('{"model.layers": 0, "lm_head": 1}'); none runs it
    whole on the CPU."""
    model_name: str | None = None
    """The language model --activations came from, recorded in cfg.json (SAELens's metadata) for files
    that do not record it (.npy/.safetensors arrays); a cache or --model records its own."""
    hook_name: str | None = None
    """The TransformerLens hook of those activations, e.g. blocks.15.hook_resid_post (its layer is recorded
    too); for arrays, like --model-name."""
    out: str = "runs/sae"
    """Run directory; it receives sae_weights.safetensors and cfg.json (SAELens layout), config.toml and
    metrics.jsonl."""
    overwrite: bool = False
    """Allow --out to name a directory that already holds a trained SAE (it is replaced)."""

    # --- architecture -----------------------------------------------------------------------------
    arch: Literal["topk", "relu", "batchtopk", "matryoshka", "jumprelu"] = "topk"
    """SAE architecture: 'topk' (the k largest latents per token), 'relu' (ReLU + L1), 'batchtopk' (the
    batch's B·k largest; a learned threshold at inference), 'matryoshka' (BatchTopK with nested prefix
    losses) or 'jumprelu' (learned per-latent thresholds and an L0 penalty), as dictionary_learning trains
    each."""
    d_sae: int = 4096
    """Number of latent features (the dictionary size)."""
    k: int = 40
    """Latents kept per token by topk, on average by batchtopk and matryoshka (ignored by relu; jumprelu's
    default --target-l0)."""
    matryoshka_fractions: str = "1/32,1/16,1/8,1/4,17/32"
    """Matryoshka: the fraction of the dictionary in each nested group, comma-separated, summing to 1 (each
    group but the last gets int(f·d_sae) latents, the last the rest)."""
    matryoshka_weights: str | None = None
    """Matryoshka: each group's reconstruction-loss weight, comma-separated; default 1/groups each."""
    target_l0: float | None = None
    """JumpReLU: the L0 its sparsity penalty coef·(L0/target − 1)² aims at; default --k."""
    jumprelu_sparsity: float = 1.0
    """JumpReLU: the coefficient of that sparsity penalty."""
    jumprelu_bandwidth: float = 0.001
    """JumpReLU: width of the straight-through estimators' rectangle kernel."""
    sparsity_warmup_steps: int | None = None
    """JumpReLU: steps over which the sparsity penalty ramps linearly from 0; default min(2000, steps/5)."""

    normalize_activations: bool | None = None
    """Train on activations scaled to unit mean squared norm (dictionary_learning's normalize_activations;
    the factor is measured on the first batch and folded into the saved biases and thresholds, so the saved
    SAE takes raw activations); default on for jumprelu, whose threshold and bandwidth constants assume that
    scale, off for the others."""

    # --- optimisation -----------------------------------------------------------------------------
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 4096
    """Activations per optimizer step."""
    lr: float | None = None
    """Adam learning rate; default 2e-4/sqrt(d_sae/2^14) for topk, batchtopk and matryoshka, 3e-4 for relu,
    7e-5 for jumprelu (dictionary_learning's defaults)."""
    warmup_steps: int | None = None
    """Linear lr warm-up steps; default min(1000, steps/10)."""
    decay_start: float = 0.8
    """Fraction of training after which the lr decays linearly to 0 (1.0 disables the decay)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    l1: float = 0.04
    """L1 coefficient of the relu SAE (latents weighted by decoder row norms)."""
    auxk_alpha: float = 1 / 32
    """Weight of the AuxK loss that revives dead latents (topk, batchtopk, matryoshka; 0 disables it)."""
    k_aux: int | None = None
    """Dead latents used by AuxK per token; default d_in/2."""
    dead_tokens: int = 10_000_000
    """A latent that has not fired for this many tokens counts as dead (accepts 10M)."""
    threshold_beta: float = 0.999
    """EMA decay of the inference threshold (mean over tokens of the smallest top-k activation)."""
    threshold_start_step: int | None = None
    """Step from which the inference threshold is tracked (batchtopk/matryoshka: the step after it, as
    dictionary_learning); default: the end of warm-up."""

    # --- orthogonality penalty --------------------------------------------------------------------
    orth: bool = False
    """Add the orthogonality penalty on co-active feature pairs (a token's co-active entries are its
    non-zero latents)."""
    orth_kind: Literal["coactive", "ortsae"] | None = None
    """Which orthogonality penalty: 'coactive' (--orth's, on co-active pairs) or 'ortsae' (OrtSAE's: each
    decoder row's largest |cos| to the others within random chunks of the dictionary). Giving it turns the
    penalty on."""
    ortsae_weight: float = 0.25
    """OrtSAE: γ, the penalty enters the loss as γ·mean_i max_j |cos(w_i, w_j)|^exponent."""
    ortsae_exponent: float = 2.0
    """OrtSAE: the power the per-feature maximal |cosine| is raised to."""
    ortsae_chunks: int | None = None
    """OrtSAE: random chunks the dictionary is split into each step (cost ∝ d_sae²/chunks); default
    ceil(d_sae/8192), i.e. chunks of at most 8192 features, so the cost is linear in d_sae."""
    orth_lambda: float = 1e-3
    """λ: the penalty enters the loss as λ·(L_recon.detach()/L_orth_init)·L_orth."""
    orth_threshold_ratio: float = 0.1
    """An entry counts as active when f_bi > ema_mean_i × this ratio."""
    orth_coactivation: Literal["product", "binary"] = "product"
    """Co-activation weights: 'product' uses A = f·mask, 'binary' uses A = mask."""
    orth_weight: Literal["decoder", "encoder"] = "decoder"
    """Feature vectors compared by cos²: decoder rows, or encoder columns (the original code's choice)."""
    orth_method: Literal["pairwise", "masked_dense", "sparse"] = "pairwise"
    """Penalty implementation; all three are exact and equal, 'pairwise' is the fast one."""
    orth_ema_decay: float = 0.99
    """Decay of the per-feature EMA of mean activation used by the mask."""
    orth_share_gather: bool = False
    """Decode from the pairwise penalty's gathered decoder rows instead of a separate embedding_bag decode
    (one gather instead of two; measured slower on CPU, where embedding_bag decodes without gathering)."""

    # --- run --------------------------------------------------------------------------------------
    seed: int = 0
    """Seed for every random choice: initialisation, data order and OrtSAE's chunks."""
    init_seed: int | None = None
    """Seed of the initialisation only (default: --seed). SAEs that differ only in it train on the same
    batches in the same order, so their spread is the seed-to-seed variation of training itself."""
    device: str = "cpu"
    """Torch device, e.g. cpu or cuda."""
    kernel: Literal["auto", "sparse", "dense"] = "auto"
    """TopK encoder backward: 'sparse' (index-adds over the selected latents only), 'dense' (one GEMM),
    'auto' (sparse unless d_sae < 8 × the latents selected per token, k plus k_aux when AuxK runs)."""
    bf16_encoder: bool = False
    """TopK: run the encoder GEMM (the step's one dense GEMM) in bfloat16; selection and kept values carry
    bf16 rounding, gradients and parameters stay fp32 (~2x faster GEMM on CPUs with AVX512-BF16)."""
    compile: bool = False
    """TopK: torch.compile the step's forward, losses and penalty (the first steps compile, ~30 s; on CPU it
    needs a C++ compiler). Measured on the 2-core CPU: no faster (TopK 0.98-1.11x, TopK+orth 1.07-1.14x the
    eager step's time), so off by default."""
    cpu_allocator: Literal["reuse", "system"] = "reuse"
    """On CPU: 'reuse' keeps freed memory in the process (glibc: no mmap, no trimming), so each step's large
    tensors land on warm pages instead of being page-faulted in again: 10-15% faster steps at the seed shape
    on the 2-core CPU, for a higher peak RSS. 'system' leaves the C library's default. Applies to the whole
    process."""
    max_skipped_batches: int = 0
    """Skip up to this many batches whose loss is NaN/inf before stopping (checking costs a host sync per
    step); 0 stops the run, without saving, at the first logging step that sees a non-finite loss."""
    log_every: int = 25
    """Write a metrics.jsonl line every this many steps."""
    checkpoint_every: int = 1000
    """Write a resumable checkpoint every this many steps (0: only when stopped by Ctrl-C/SIGTERM); the
    run directory keeps the last two. Continue a run with `orthosae train --resume RUN_DIR`."""
    progress: bool = True
    """Show a progress bar."""
    tensorboard: bool = True
    """Also write each metrics line as TensorBoard scalars to OUT/tensorboard (tensorboard --logdir runs)."""
    wandb_project: str | None = None
    """Also log to this Weights & Biases project (needs `pip install wandb` and a login; off by default)."""
    dist_timeout: float = 300.0
    """Multi-process runs (torchrun): seconds a rank waits for the others in a collective before it stops
    with an error, so a rank that hangs or dies never leaves the rest waiting forever."""

    def validate(self) -> None:
        if (self.activations is None) == (self.model is None):
            raise UserError(
                "give exactly one data source: --activations FILE_OR_CACHE or --model NAME --layer L"
            )
        if self.model is not None and self.layer is None:
            raise UserError("--model needs --layer (the decoder block whose output to train on)")
        self._validate_device_map()
        for name in ("d_sae", "k", "steps", "batch_size", "log_every", "context_size", "dead_tokens"):
            if getattr(self, name) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be positive, got {getattr(self, name)}")
        if self.arch in ("topk", "batchtopk", "matryoshka") and self.k > self.d_sae:
            raise UserError(f"--k {self.k} is larger than --d-sae {self.d_sae}; k must be at most d_sae")
        self._validate_archs()
        for name in ("l1", "auxk_alpha", "grad_clip", "orth_lambda", "orth_threshold_ratio"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {value}")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise UserError(f"--lr must be a positive number, got {self.lr}")
        if not 0.0 < self.decay_start <= 1.0:
            raise UserError(f"--decay-start must be a fraction in (0, 1], got {self.decay_start}")
        for name in ("threshold_beta", "orth_ema_decay"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if self.warmup_steps is not None and not 0 <= self.warmup_steps < self.steps:
            raise UserError(f"--warmup-steps must be in [0, steps={self.steps}), got {self.warmup_steps}")
        if self.max_skipped_batches < 0:
            raise UserError(f"--max-skipped-batches must be ≥ 0, got {self.max_skipped_batches}")
        if not (math.isfinite(self.dist_timeout) and self.dist_timeout > 0):
            raise UserError(f"--dist-timeout must be a positive number of seconds, got {self.dist_timeout}")
        if self.k_aux is not None and self.k_aux <= 0:
            raise UserError(f"--k-aux must be positive, got {self.k_aux}")
        assert self.orth_method in METHODS and self.orth_coactivation in COACTIVATIONS

    def _validate_device_map(self) -> None:
        from orthosae.models.placement import parse_device_map

        if parse_device_map(self.model_device_map) is not None and self.model is None:
            raise UserError("--model-device-map places the streaming --model: it needs --model, not a cache")

    def _validate_archs(self) -> None:
        """The architecture- and penalty-specific fields (matryoshka, jumprelu, ortsae)."""
        from orthosae.sae.matryoshka import check_groups, parse_fractions  # the sae package imports us

        if self.arch == "matryoshka":
            try:
                fractions = parse_fractions(self.matryoshka_fractions)
                given = self.matryoshka_weights
                weights = None if given is None else parse_fractions(given)
            except (ValueError, ZeroDivisionError):
                raise UserError(
                    "--matryoshka-fractions/--matryoshka-weights must be comma-separated numbers such as "
                    f"1/32,1/16,0.5; got {self.matryoshka_fractions!r} / {self.matryoshka_weights!r}"
                ) from None
            problem = check_groups(self.d_sae, fractions, weights)
            if problem is not None:
                raise UserError(f"--matryoshka-fractions {self.matryoshka_fractions}: {problem}")
        if self.target_l0 is not None and not (math.isfinite(self.target_l0) and self.target_l0 > 0):
            raise UserError(f"--target-l0 must be a positive number, got {self.target_l0}")
        if not (math.isfinite(self.jumprelu_bandwidth) and self.jumprelu_bandwidth > 0):
            raise UserError(f"--jumprelu-bandwidth must be a positive number, got {self.jumprelu_bandwidth}")
        for name in ("jumprelu_sparsity", "ortsae_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise UserError(f"--{name.replace('_', '-')} must be a finite number ≥ 0, got {value}")
        warm = self.sparsity_warmup_steps
        if warm is not None and not 0 <= warm < self.steps:
            raise UserError(f"--sparsity-warmup-steps must be in [0, steps={self.steps}), got {warm}")
        if not (math.isfinite(self.ortsae_exponent) and self.ortsae_exponent > 0):
            raise UserError(f"--ortsae-exponent must be a positive number, got {self.ortsae_exponent}")
        if self.ortsae_chunks is not None and not 1 <= self.ortsae_chunks <= self.d_sae:
            raise UserError(f"--ortsae-chunks must be in [1, d_sae={self.d_sae}], got {self.ortsae_chunks}")

    # Derived values, in one place so the trainer and the saved cfg agree.
    def penalty_kind(self) -> str:
        """'none', 'coactive' or 'ortsae': --orth-kind when given, else 'coactive' with --orth."""
        if self.orth_kind is not None:
            return self.orth_kind
        return "coactive" if self.orth else "none"

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.arch in ("topk", "batchtopk", "matryoshka"):
            return 2e-4 / math.sqrt(self.d_sae / 2**14)
        return 7e-5 if self.arch == "jumprelu" else 3e-4

    def resolved_normalize(self) -> bool:
        if self.normalize_activations is not None:
            return self.normalize_activations
        return self.arch == "jumprelu"

    def resolved_target_l0(self) -> float:
        return self.target_l0 if self.target_l0 is not None else float(self.k)

    def resolved_sparsity_warmup(self) -> int:
        if self.sparsity_warmup_steps is not None:
            return self.sparsity_warmup_steps
        return min(2000, self.steps // 5)

    def resolved_group_weights(self, groups: int) -> list[float]:
        from orthosae.sae.matryoshka import parse_fractions

        if self.matryoshka_weights is None:
            return [1.0 / groups] * groups
        return parse_fractions(self.matryoshka_weights)

    def resolved_ortsae_chunks(self) -> int:
        return self.ortsae_chunks if self.ortsae_chunks is not None else max(1, math.ceil(self.d_sae / 8192))

    def resolved_init_seed(self) -> int:
        return self.seed if self.init_seed is None else self.init_seed

    def trains_like(self, other: TrainConfig) -> bool:
        """Same settings, reading an unset init_seed as --seed: an SAE trained alone (init_seed unset) is
        the first member of the same table with `seeds = N` (init_seed = seed)."""
        return replace(self, init_seed=self.resolved_init_seed()) == replace(
            other, init_seed=other.resolved_init_seed()
        )

    def resolved_warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else min(1000, self.steps // 10)

    def resolved_threshold_start(self) -> int:
        return self.threshold_start_step if self.threshold_start_step is not None else self.resolved_warmup()
