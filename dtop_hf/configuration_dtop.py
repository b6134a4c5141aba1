# Copyright 2026 The dtop-hf Authors.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""DToP model configuration."""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.utils import logging


logger = logging.get_logger(__name__)


def per_head_fractions(
    value: float | str | list[float | str] | tuple[float | str, ...], name: str, example: str, meaning: str
) -> tuple[tuple[float, ...], bool]:
    """`value` read as numbers in (0, 1], and whether it was given per auxiliary head; the command-line form
    `"0.9"` or `"0.9,0.95"` too. `name`, `example` and `meaning` word the errors."""
    if isinstance(value, str) and "," in value:
        value = value.split(",")
    per_head = isinstance(value, (list, tuple))
    try:
        values = tuple(float(item) for item in (value if per_head else [value]))
    except (TypeError, ValueError):
        raise ValueError(f"An `{name}` is a number or one per auxiliary head ('{example}'), got {value!r}.") from None
    if not all(0.0 < item <= 1.0 for item in values):
        raise ValueError(f"`{name}` must lie in (0, 1] ({meaning}1.0 = no exit), got {list(values)}.")
    return values, per_head


def normalize_exit_threshold(
    exit_threshold: float | str | list[float | str] | tuple[float | str, ...],
) -> float | tuple[float, ...]:
    """An exit threshold as the config stores it: one float for every auxiliary head, or a tuple of one per head;
    each in (0, 1] (1.0 = no exit). Also reads the command-line form, `"0.9"` or `"0.9,0.95"`.

    Raises:
        ValueError: a value is not a number or lies outside (0, 1].
    """
    values, per_head = per_head_fractions(exit_threshold, "exit_threshold", "0.9,0.95", "")
    return values if per_head else values[0]


EXIT_MODES = ("threshold", "capacity")


def check_exit_mode(exit_mode: str) -> str:
    """`exit_mode` itself, when it is one of [`EXIT_MODES`]."""
    if exit_mode not in EXIT_MODES:
        raise ValueError(f"`exit_mode` must be 'threshold' or 'capacity', got {exit_mode!r}.")
    return exit_mode


def normalize_exit_capacity(
    exit_capacity: float | str | list[float | str] | tuple[float | str, ...],
) -> float | tuple[float, ...]:
    """An exit capacity as the config stores it: one float for every auxiliary head, or a tuple of one per head;
    each in (0, 1] (the fraction of an image's patch tokens still active after the head; 1.0 = no exit) and
    non-increasing from head to head (a token that exited never comes back). Also reads the command-line form,
    `"0.5"` or `"0.5,0.3"`.

    Raises:
        ValueError: a value is not a number, lies outside (0, 1], or is above the one of an earlier head.
    """
    meaning = "the fraction of patch tokens still active after an auxiliary head; "
    values, per_head = per_head_fractions(exit_capacity, "exit_capacity", "0.5,0.3", meaning)
    if any(later > earlier for earlier, later in zip(values, values[1:])):
        raise ValueError(
            "`exit_capacity` must not increase from one auxiliary head to the next (a token that exited never comes "
            f"back), got {list(values)}."
        )
    return values if per_head else values[0]


@strict
class DToPConfig(PreTrainedConfig):
    r"""
    Configuration of a DToP segmenter: a plain ViT split into stages by ATM (or FCN) heads, whose auxiliary
    heads let confident tokens exit early ("Dynamic Token Pruning in Plain Vision Transformers for Semantic
    Segmentation", Tang et al., ICCV 2023). The defaults give the official ViT-B/16 ADE20K model.

    Backbone (names and meaning as in [`ViTConfig`], so that ViT checkpoints map one to one):
        hidden_size (`int`, *optional*, defaults to 768): width of the ViT tokens.
        num_hidden_layers (`int`, *optional*, defaults to 12): number of ViT layers.
        num_attention_heads (`int`, *optional*, defaults to 12): attention heads per ViT layer.
        intermediate_size (`int`, *optional*, defaults to 3072): width of the ViT MLP.
        hidden_act (`str`, *optional*, defaults to `"gelu"`): MLP activation (exact erf GELU, as the official code).
        hidden_dropout_prob (`float`, *optional*, defaults to 0.0): dropout on the embeddings and residual branches.
        drop_path_rate (`float`, *optional*, defaults to 0.0): stochastic depth on the MLP branch of each layer, per
            image, in training only. The rate rises linearly from 0 at the first layer to this value at the last
            (mmseg's `dpr`); the attention branch gets none, as in mmseg 1.x's ViT (official: 0.1 for ViT-B, 0.3
            for ViT-L).
        attention_probs_dropout_prob (`float`, *optional*, defaults to 0.0): dropout on the ViT attention weights.
        initializer_range (`float`, *optional*, defaults to 0.02): std of the truncated-normal initialisation.
        layer_norm_eps (`float`, *optional*, defaults to 1e-6): epsilon of the ViT layer norms.
        image_size (`int`, *optional*, defaults to 512): side of the square grid the position embeddings are
            stored for. Other input sizes are served by bicubic resizing of the position embeddings.
        patch_size (`int`, *optional*, defaults to 16): side of a patch; one token per patch.
        num_channels (`int`, *optional*, defaults to 3): input channels.
        qkv_bias (`bool`, *optional*, defaults to `True`): bias in the query/key/value projections.
        use_cls_token (`bool`, *optional*, defaults to `False`): keep ViT's class token through the layers. The
            official DToP drops it before the first layer; when kept it never exits and never reaches a head.
        use_distillation_token (`bool`, *optional*, defaults to `False`): keep DeiT's distillation token after the
            class token (needs `use_cls_token`); the position embeddings then store two extra slots, as DeiT's do.
        num_register_tokens (`int`, *optional*, defaults to 0): register tokens (DINOv2 with registers, DINOv3)
            after the class and distillation tokens; they have no position embedding. Like the class token, these
            "prefix" tokens attend and are attended to in every layer, never exit and never reach a head.
        layerscale_value (`float`, *optional*): initial value of a learned per-channel scale on both residual
            branches (DINOv2, DINOv3); `None` (ViT, DeiT) for no layer scale.
        use_gated_mlp (`bool`, *optional*, defaults to `False`): gated MLP `down(act(gate(x)) * up(x))` of width
            `intermediate_size` (DINOv2's SwiGLU, DINOv3's gated MLP) instead of `fc2(act(fc1(x)))`.
        key_bias (`bool`, *optional*): bias in the key projection; `None` follows `qkv_bias` (DINOv3 has none).
        position_embedding_type (`str`, *optional*, defaults to `"absolute"`): `"absolute"` (learned embeddings of
            a stored grid, resized bicubic to other grids) or `"rope"` (DINOv3's 2-D rotary embedding of each patch's
            normalised grid position, applied to queries and keys of the patch tokens; no learned positions).
        position_embedding_antialias (`bool`, *optional*, defaults to `False`): resize absolute position embeddings
            with antialiasing (DINOv2 with registers does), which also changes the bicubic kernel when enlarging.
        rope_theta (`float`, *optional*, defaults to 100.0): base period of the rotary embedding.
        rope_shift (`float`, *optional*): in training only, shift the rotary coordinates by a random value in
            `[-rope_shift, rope_shift]` (DINOv3's `pos_embed_shift`).
        rope_jitter (`float`, *optional*): in training only, scale each axis's coordinates by a log-uniform value in
            `[1 / rope_jitter, rope_jitter]` (DINOv3's `pos_embed_jitter`).
        rope_rescale (`float`, *optional*): in training only, scale both axes' coordinates by a log-uniform value in
            `[1 / rope_rescale, rope_rescale]` (DINOv3's `pos_embed_rescale`).

    Stages:
        out_indices (`tuple[int]`, *optional*, defaults to `(5, 7, 11)`): 0-based ViT layers after which a head
            runs. The last one must be the last layer (the decode head); the others are auxiliary heads, each
            of which can make tokens exit.

    Heads:
        head_type (`str`, *optional*, defaults to `"atm"`): `"atm"` (SegViT attention-to-mask head, the official
            DToP head) or `"fcn"` (SETR-naive per-token classifier).
        head_hidden_size (`int`, *optional*, defaults to 384): width D of every head.
        head_num_attention_heads (`int`, *optional*, defaults to 6): attention heads in the ATM decoder layers.
        head_num_layers (`int`, *optional*, defaults to 3): ATM decoder layers per head.
        head_intermediate_size (`int`, *optional*): width of the ATM decoder FFN; defaults to `4 * head_hidden_size`.
        head_dropout (`float`, *optional*, defaults to 0.1): dropout in the ATM decoder layers (training only).
        head_layer_norm_eps (`float`, *optional*, defaults to 1e-5): epsilon of the head layer norms.

    Pruning:
        exit_mode (`str`, *optional*, defaults to `"threshold"`): how the auxiliary heads choose the tokens that exit.
            `"threshold"` (DToP's rule): tokens whose top class score is above `exit_threshold` exit, so every image
            keeps its own number of tokens. `"capacity"`: after each auxiliary head exactly
            `ceil(exit_capacity * num_patches)` tokens of every image go on (the per-class top-k context tokens
            first, rank by rank when they outnumber the places, then the least confident ones, ties to the earlier
            token), so every image keeps the same number: dense static-shape tensors, plain attention without a key
            mask, no host sync, one graph for `torch.compile(fullgraph=True)` and for ONNX export. Exited tokens keep
            their prediction in both modes.
        exit_threshold (`float` or `tuple[float]`, *optional*, defaults to 0.9): a token whose top class score is
            strictly above this value exits after an auxiliary head. One value for every auxiliary head, or one
            per auxiliary head. 1.0 switches pruning off (the unpruned baseline). The decode head never prunes.
            Threshold mode only.
        exit_capacity (`float` or `tuple[float]`, *optional*): capacity mode's fraction of an image's patch tokens
            still active after each auxiliary head, in (0, 1]: one value for every auxiliary head, or one per
            auxiliary head, non-increasing (a token that exited never comes back). 1.0 = no exit.
        keep_top_k (`int`, *optional*, defaults to 5): per image and per predicted class, the `keep_top_k` most
            confident exit candidates stay in, to keep context for the hard tokens (5 in the official code). In
            capacity mode the same per-class top-k tokens go on first, see `exit_mode`.
        prune_during_training (`bool`, *optional*, defaults to `False`): whether tokens exit in training mode. In
            eval mode the thresholds (config or per-call `exit_threshold`) always apply; in training mode they
            apply only when this is True, so that training a fresh model (phase 1, e.g. with `Trainer`) never
            starts pruning by surprise once its heads grow confident. The prune fine-tuning (phase 2 of the official
            recipe) sets it to True.

        The exit decision (class scores, confidence, threshold test, top-k ranking) is always computed in float32
        from the head's logits, whatever the compute dtype, and the ATM mask logits (which rank a class's tokens)
        are computed in float32 too: in bf16 most candidates of a class would tie, and the top-k would fall back to
        token order. Measured on a small trained model (quick-start size, 200 synthetic validation scenes, CPU bf16
        autocast vs float32), the share of tokens whose exit stage changes fell from 1.31% to 0.35% at threshold
        0.7 and from 2.58% to 0.51% at 0.5; what remains comes from the bf16 activations themselves
        (docs/exit_decisions_in_bf16.md).

    Loss (the official recipe's):
        no_object_weight (`float`, *optional*, defaults to 0.1): class weight of "no object" in the presence loss.
        mask_focal_weight (`float`, *optional*, defaults to 20.0): weight of the sigmoid focal mask loss.
        mask_dice_weight (`float`, *optional*, defaults to 1.0): weight of the dice mask loss.
        focal_alpha (`float`, *optional*, defaults to 0.25): focal loss alpha.
        focal_gamma (`float`, *optional*, defaults to 2.0): focal loss gamma.
        stage_loss_weights (`tuple[float]`, *optional*): weight of each head's loss; defaults to 1.0 for all.
        ignore_pixels_as_negatives (`bool`, *optional*, defaults to `False`): the official code counts ignored
            pixels as negatives of every mask; by default they are ignored instead.
        semantic_loss_ignore_index (`int`, *optional*, defaults to 255): label value that is ignored.

    Example:

    ```python
    >>> from dtop_hf import DToPConfig, DToPForSemanticSegmentation

    >>> config = DToPConfig(num_labels=150)  # ViT-B/16, ADE20K heads, threshold 0.9
    >>> model = DToPForSemanticSegmentation(config)
    ```"""

    model_type = "dtop"
    # transformers.Trainer keeps every output except these at evaluation: only `logits` (and the loss) are kept,
    # which is what metrics read, instead of 7x the logits' memory in per-stage outputs.
    keys_to_ignore_at_inference = [
        "exit_stage",
        "tokens_per_layer",
        "stage_logits",
        "stage_class_logits",
        "stage_mask_logits",
        "hidden_states",
        "attentions",
        "patch_offsets",
    ]

    # backbone
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float | int = 0.0
    drop_path_rate: float | int = 0.0
    attention_probs_dropout_prob: float | int = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-6
    image_size: int = 512
    patch_size: int = 16
    num_channels: int = 3
    qkv_bias: bool = True
    use_cls_token: bool = False
    use_distillation_token: bool = False
    num_register_tokens: int = 0
    layerscale_value: float | int | None = None
    use_gated_mlp: bool = False
    key_bias: bool | None = None
    position_embedding_type: str = "absolute"
    position_embedding_antialias: bool = False
    rope_theta: float | int = 100.0
    rope_shift: float | int | None = None
    rope_jitter: float | int | None = None
    rope_rescale: float | int | None = None
    # stages
    out_indices: list[int] | tuple[int, ...] = (5, 7, 11)
    # heads
    head_type: str = "atm"
    head_hidden_size: int = 384
    head_num_attention_heads: int = 6
    head_num_layers: int = 3
    head_intermediate_size: int | None = None
    head_dropout: float | int = 0.1
    head_layer_norm_eps: float = 1e-5
    # pruning
    exit_mode: str = "threshold"
    exit_threshold: float | int | list[float | int] | tuple[float | int, ...] = 0.9
    exit_capacity: float | int | list[float | int] | tuple[float | int, ...] | None = None
    keep_top_k: int = 5
    prune_during_training: bool = False
    # loss
    no_object_weight: float = 0.1
    mask_focal_weight: float = 20.0
    mask_dice_weight: float = 1.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    stage_loss_weights: list[float | int] | tuple[float | int, ...] | None = None
    ignore_pixels_as_negatives: bool = False
    semantic_loss_ignore_index: int = 255

    def __post_init__(self, **kwargs):
        self.out_indices = tuple(int(index) for index in self.out_indices)
        if isinstance(self.exit_threshold, (list, tuple)):
            self.exit_threshold = tuple(float(value) for value in self.exit_threshold)
        else:
            self.exit_threshold = float(self.exit_threshold)
        if isinstance(self.exit_capacity, (list, tuple)):
            self.exit_capacity = tuple(float(value) for value in self.exit_capacity)
        elif self.exit_capacity is not None:
            self.exit_capacity = float(self.exit_capacity)
        if self.head_intermediate_size is None:
            self.head_intermediate_size = 4 * self.head_hidden_size
        if self.stage_loss_weights is not None:
            self.stage_loss_weights = tuple(float(value) for value in self.stage_loss_weights)
        super().__post_init__(**kwargs)

    @property
    def num_stages(self) -> int:
        """Number of heads (auxiliary heads + the decode head)."""
        return len(self.out_indices)

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patch tokens in the backbone: class, distillation and register tokens that are kept.
        They never exit and never reach a head."""
        return int(self.use_cls_token) + int(self.use_distillation_token) + self.num_register_tokens

    def exit_thresholds_per_head(
        self, exit_threshold: float | list[float] | tuple[float, ...] | None = None
    ) -> tuple[float, ...]:
        """One threshold per head, the decode head's being 1.0 (it never prunes).

        Args:
            exit_threshold: an override with the same meaning as the config field; `None` uses the config's.
        """
        threshold = normalize_exit_threshold(self.exit_threshold if exit_threshold is None else exit_threshold)
        return self._one_per_auxiliary_head("exit_threshold", threshold) + (1.0,)

    def exit_capacities_per_head(
        self, exit_capacity: float | list[float] | tuple[float, ...] | None = None
    ) -> tuple[float, ...]:
        """One capacity per head (the fraction of an image's patch tokens still active after it), the decode head's
        being 1.0 (it never prunes).

        Args:
            exit_capacity: an override with the same meaning as the config field; `None` uses the config's.
        """
        capacity = self.exit_capacity if exit_capacity is None else exit_capacity
        if capacity is None:
            raise ValueError(
                "Capacity mode needs `exit_capacity`: the fraction in (0, 1] of an image's patch tokens still active "
                "after each auxiliary head (one value, or one per auxiliary head), got None."
            )
        return self._one_per_auxiliary_head("exit_capacity", normalize_exit_capacity(capacity)) + (1.0,)

    def exit_rule(
        self,
        exit_mode: str | None = None,
        exit_threshold: float | list[float] | tuple[float, ...] | None = None,
        exit_capacity: float | list[float] | tuple[float, ...] | None = None,
    ) -> tuple[str, tuple[float, ...]]:
        """The exit mode of a call and its values per head (thresholds or capacities, the decode head's 1.0).

        Per-call arguments override the config. Without `exit_mode`, the knob given says the mode (`exit_threshold`:
        threshold mode, `exit_capacity`: capacity mode); with neither, the config's mode and values apply.

        Raises:
            ValueError: an unknown mode, the knob of the other mode, or values the mode rejects.
        """
        if exit_mode is None:
            if exit_threshold is not None and exit_capacity is not None:
                raise ValueError(
                    "Got both `exit_threshold` and `exit_capacity`: pass `exit_mode` ('threshold' or 'capacity') "
                    "too, or only the knob of the rule you want."
                )
            if exit_capacity is not None:
                exit_mode = "capacity"
            elif exit_threshold is not None:
                exit_mode = "threshold"
        exit_mode = check_exit_mode(self.exit_mode if exit_mode is None else exit_mode)
        if exit_mode == "threshold":
            if exit_capacity is not None:
                raise ValueError("`exit_capacity` applies in capacity mode only, got exit_mode='threshold'.")
            return exit_mode, self.exit_thresholds_per_head(exit_threshold)
        if exit_threshold is not None:
            raise ValueError("`exit_threshold` applies in threshold mode only, got exit_mode='capacity'.")
        return exit_mode, self.exit_capacities_per_head(exit_capacity)

    def _one_per_auxiliary_head(self, name: str, value: float | tuple[float, ...]) -> tuple[float, ...]:
        """A normalised setting (one float, or a tuple) as one value per auxiliary head; `name` for the error."""
        num_auxiliary = len(self.out_indices) - 1
        if not isinstance(value, tuple):
            return (value,) * num_auxiliary
        if len(value) != num_auxiliary:
            raise ValueError(f"Expected one `{name}` value per auxiliary head ({num_auxiliary}), got {list(value)}.")
        return value

    def validate_architecture(self):
        """Cross-field checks; run at construction and again by `save_pretrained`."""
        super().validate_architecture()
        num_layers, indices = self.num_hidden_layers, list(self.out_indices)
        if not indices or indices != sorted(set(indices)) or indices[0] < 0 or indices[-1] >= num_layers:
            raise ValueError(
                f"`out_indices` must be strictly increasing layer indices in [0, {num_layers}), got {indices}."
            )
        if indices[-1] != num_layers - 1:
            raise ValueError(
                f"The last of `out_indices` is the decode head and must be the last layer ({num_layers - 1}), "
                f"got {indices}."
            )
        self.exit_thresholds_per_head()
        check_exit_mode(self.exit_mode)
        if self.exit_mode == "capacity" or self.exit_capacity is not None:
            self.exit_capacities_per_head()
        if self.keep_top_k < 0:
            raise ValueError(f"`keep_top_k` must be >= 0, got {self.keep_top_k}.")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"`drop_path_rate` must lie in [0, 1), got {self.drop_path_rate}.")
        if self.head_type not in ("atm", "fcn"):
            raise ValueError(f"`head_type` must be 'atm' or 'fcn', got {self.head_type!r}.")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads})."
            )
        if self.head_hidden_size % self.head_num_attention_heads:
            raise ValueError(
                f"`head_hidden_size` ({self.head_hidden_size}) must be divisible by `head_num_attention_heads` "
                f"({self.head_num_attention_heads})."
            )
        for name in ("image_size", "patch_size", "head_num_layers", "hidden_size", "head_hidden_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}.")
        if self.stage_loss_weights is not None and len(self.stage_loss_weights) != len(indices):
            raise ValueError(
                f"`stage_loss_weights` needs one weight per head ({len(indices)}), "
                f"got {list(self.stage_loss_weights)}."
            )
        self.validate_backbone_family()

    def validate_backbone_family(self):
        """Checks of the fields that reproduce the other ViT families (extra tokens, rotary positions)."""
        if self.num_register_tokens < 0:
            raise ValueError(f"`num_register_tokens` must be >= 0, got {self.num_register_tokens}.")
        if self.use_distillation_token and not self.use_cls_token:
            raise ValueError(
                "`use_distillation_token=True` needs `use_cls_token=True` (DeiT's distillation token follows its "
                "class token), got `use_cls_token=False`."
            )
        if self.position_embedding_type not in ("absolute", "rope"):
            raise ValueError(
                f"`position_embedding_type` must be 'absolute' or 'rope', got {self.position_embedding_type!r}."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if self.position_embedding_type == "rope" and head_dim % 4:
            raise ValueError(
                "The 2-D rotary embedding splits each attention head in four: `hidden_size // num_attention_heads` "
                f"must be a multiple of 4, got {head_dim}."
            )


__all__ = ["EXIT_MODES", "DToPConfig", "check_exit_mode", "normalize_exit_capacity", "normalize_exit_threshold"]
