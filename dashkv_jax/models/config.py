"""Frozen architecture configs: Llama-family decoders (Llama, Qwen2, Mistral, SmolLM) and Gemma 3.

`ModelConfig` is also what attention backends, hashers and captures see of any model: for Gemma 3
it is a view of the global layers only (`Gemma3Config.attention_view`)."""

import dataclasses


@dataclasses.dataclass(slots=True, frozen=True)
class RopeScaling:
    """RoPE frequency scaling: `linear` (position interpolation) or `llama3` (by wavelength)."""

    kind: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192

    def __post_init__(self):
        if self.kind not in ("linear", "llama3"):
            raise ValueError(
                f"unsupported rope scaling {self.kind!r}: expected 'linear' or 'llama3'"
            )


@dataclasses.dataclass(slots=True, frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "llama"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim=}")

    @property
    def group_size(self) -> int:
        """Query heads per KV head (G in GQA)."""
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(slots=True, frozen=True)
class Gemma3Config:
    """Gemma 3 text decoder: sliding-window local layers and global layers, QK-norm, GeGLU."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    sliding_window: int
    global_layers: tuple[int, ...]  # indices of the full-attention layers, ascending
    rope_theta: float = 1_000_000.0  # global layers
    rope_scaling: RopeScaling | None = None  # global layers only
    rope_local_theta: float = 10_000.0
    query_pre_attn_scalar: float = 256.0
    rms_norm_eps: float = 1e-6
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    name: str = "gemma3"

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.num_heads=} is not a multiple of {self.num_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"RoPE needs an even head_dim, got {self.head_dim=}")
        if self.sliding_window < 1:
            raise ValueError(f"the sliding window must be positive, got {self.sliding_window=}")
        layers = self.global_layers
        if (
            not layers
            or list(layers) != sorted(set(layers))
            or not 0 <= layers[0] <= layers[-1] < self.num_layers
        ):
            raise ValueError(
                f"global_layers must be ascending layer indices in [0, {self.num_layers}), at "
                f"least one: got {layers}"
            )

    @staticmethod
    def pattern(num_layers: int, period: int) -> tuple[int, ...]:
        """Global layers of `period - 1` local layers then one global, repeated (Gemma 3: 6)."""
        return tuple(i for i in range(num_layers) if (i + 1) % period == 0)

    @property
    def is_global(self) -> tuple[bool, ...]:
        """Per layer: full attention (True) or sliding-window attention (False)."""
        return tuple(i in self.global_layers for i in range(self.num_layers))

    @property
    def num_local_layers(self) -> int:
        return self.num_layers - len(self.global_layers)

    @property
    def attention_view(self) -> ModelConfig:
        """What backends, hashers and captures see: the global layers (their RoPE) alone."""
        return ModelConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_layers=len(self.global_layers),
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim,
            max_position=self.max_position,
            rope_theta=self.rope_theta,
            rope_scaling=self.rope_scaling,
            rms_norm_eps=self.rms_norm_eps,
            tie_embeddings=True,
            bos_token_id=self.bos_token_id,
            eos_token_ids=self.eos_token_ids,
            name=self.name,
        )
