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
"""The bookkeeping of dynamic token pruning, as pure tensor functions (no modules, no config).

Vocabulary: `tokens` are the h*w patch tokens of an image in row-major order; a token is *active* while it is
still in the network; it *exits* after an auxiliary head when its top class score is high enough (threshold mode)
or when it is not among the tokens the head's capacity lets go on (capacity mode); the *canvas* holds, per token,
the per-class values of the last head that saw it; a *packing* lays the active tokens of all images of a batch end
to end in one sequence, so that the linear layers only touch active tokens (in an exported graph in threshold mode,
every image's run is padded to the batch's largest count: `TokenPacking.padded`).
"""

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


def atm_class_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor) -> torch.Tensor:
    """Per-token class scores of an ATM head: presence probability x sigmoid(mask logit).

    Args:
        class_logits: `(batch, num_labels, 2)`, column 0 = "class present", column 1 = "no object".
        mask_logits: `(batch, num_labels, tokens)`.

    Returns:
        `(batch, num_labels, tokens)` scores in [0, 1].
    """
    presence = class_logits.softmax(dim=-1)[..., 0:1]  # (batch, num_labels, 1)
    return presence * mask_logits.sigmoid()


def token_confidence(class_scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top class score and its class, per token.

    Args:
        class_scores: `(batch, num_labels, tokens)`.

    Returns:
        `confidence` `(batch, tokens)` float and `predicted_class` `(batch, tokens)` int64.
    """
    confidence, predicted_class = class_scores.max(dim=1)
    return confidence, predicted_class


def rank_within_class(
    confidence: torch.Tensor, predicted_class: torch.Tensor, candidate_mask: torch.Tensor
) -> torch.Tensor:
    """Rank of each candidate among the candidates of its image that predict the same class, most confident first.

    Equal confidences are ranked by token order (the earlier token first). Vectorised over the batch, with no host
    sync and only operations that export to ONNX (two stable sorts, gathers, a scatter-add and cumulative sums).

    Args:
        confidence: `(batch, tokens)` float, top class score per token.
        predicted_class: `(batch, tokens)` int64, the class of that score.
        candidate_mask: `(batch, tokens)` bool, the tokens to rank.

    Returns:
        `(batch, tokens)` int64: 0 for the most confident candidate of each class, 1 for the next, ...; the ranks
        of non-candidates are meaningless (they sort after every candidate).
    """
    num_tokens = confidence.shape[1]
    # Order every image's tokens by (class, confidence descending, token index): two stable sorts. Non-candidates
    # get confidence -inf and a class past every real one, so they sort last and never count toward a group.
    # (Scalars, not full tensors, fill the `where`s: an exported graph then needs no shape arithmetic for them.)
    sort_confidence = torch.where(candidate_mask, confidence, float("-inf"))
    by_confidence = torch.sort(sort_confidence, dim=1, descending=True, stable=True).indices  # (batch, tokens)
    sort_class = torch.where(candidate_mask, predicted_class, torch.iinfo(torch.int64).max)
    class_in_confidence_order = sort_class.gather(1, by_confidence)
    by_class = torch.sort(class_in_confidence_order, dim=1, stable=True).indices
    order = by_confidence.gather(1, by_class)  # (batch, tokens): token indices grouped by class, best first
    ordered_class = sort_class.gather(1, order)
    # Rank inside each class group = position - position of the group's first token. Groups are numbered in order
    # along the row (the first token starts group 0); a group starts at the number of tokens of the groups before it.
    new_group = (ordered_class[:, 1:] != ordered_class[:, :-1]).long()  # (batch, tokens - 1)
    group_id = F.pad(new_group.cumsum(dim=1), (1, 0))  # (batch, tokens)
    group_size = torch.zeros_like(group_id).scatter_add(1, group_id, torch.ones_like(group_id))
    group_first_position = (group_size.cumsum(dim=1) - group_size).gather(1, group_id)
    position = torch.arange(num_tokens, device=confidence.device)  # broadcast over the batch
    rank_in_order = position - group_first_position
    return torch.zeros_like(rank_in_order).scatter(1, order, rank_in_order)


def select_exiting_tokens(
    confidence: torch.Tensor,
    predicted_class: torch.Tensor,
    active_mask: torch.Tensor,
    threshold: float,
    keep_top_k: int,
) -> torch.Tensor:
    """Which active tokens exit after an auxiliary head, in threshold mode.

    A token is a candidate when it is active and its confidence is *strictly* above `threshold` (as in the official
    code: `>`, so threshold 1.0 never prunes). For every class that is the prediction of at least one candidate of
    an image, the `keep_top_k` candidates of that class with the highest confidence stay in (they keep context for
    the hard tokens); every other candidate exits. Equal confidences are broken by token order: the earlier token
    stays. Everything is per image, so an image's decision never depends on its batch-mates.

    Args:
        confidence: `(batch, tokens)` float, top class score per token (values of inactive tokens are ignored).
        predicted_class: `(batch, tokens)` int64, the class of that score.
        active_mask: `(batch, tokens)` bool, True for tokens still in the network.
        threshold: exit threshold in (0, 1].
        keep_top_k: number of candidates kept per (image, class), >= 0.

    Returns:
        `exit_mask` `(batch, tokens)` bool, True for the tokens that exit after this head.
    """
    candidate_mask = active_mask & (confidence > threshold)
    if keep_top_k == 0:
        return candidate_mask
    kept_mask = rank_within_class(confidence, predicted_class, candidate_mask) < keep_top_k
    return candidate_mask & ~kept_mask


def num_tokens_kept(capacity: float, num_tokens: int) -> int:
    """Tokens of an image still active after a head of capacity `capacity`: `ceil(capacity * num_tokens)`.

    The product is rounded to 9 decimals first, so that float error cannot add a token (0.7 * 10 is
    7.000000000000001 in floating point; 7 tokens go on, not 8). At least one token goes on.
    """
    return max(1, math.ceil(round(capacity * num_tokens, 9)))


def select_kept_tokens(
    confidence: torch.Tensor,
    predicted_class: torch.Tensor,
    active_mask: torch.Tensor | None,
    num_kept: int,
    keep_top_k: int,
    num_classes: int | None = None,
) -> torch.Tensor:
    """Which active tokens go on after an auxiliary head, in capacity mode: exactly `num_kept` per image.

    Every image keeps the same number of tokens, so the kept tokens of a batch form a dense `(batch, num_kept)`
    layout with static shapes. Places are filled in this order:

    1. Context tokens, as in threshold mode: per predicted class, the `keep_top_k` most confident active tokens
       (every active token is an exit candidate here). When there are more of them than places, every class's most
       confident token comes first, then every class's second, ... (rank by rank, so that as many classes as
       possible keep a representative), and within one rank the more confident token, then the earlier one.
    2. Then the least confident active tokens (the hard ones, which the later layers should refine), ties broken by
       the lower token index.

    Every other active token exits. Everything is per image and vectorised: only operations that export to ONNX,
    and no host sync when `num_classes` is given.

    Args:
        confidence: `(batch, tokens)` float, top class score per token (values of inactive tokens are ignored).
        predicted_class: `(batch, tokens)` int64, the class of that score.
        active_mask: `(batch, tokens)` bool, True for tokens still in the network; every image must have at least
            `num_kept` active tokens. `None`: every token is active (the model passes the rows of its dense packing,
            the active tokens in token order, so that it ranks only those).
        num_kept: tokens per image that go on (see [`num_tokens_kept`]).
        keep_top_k: context tokens per (image, class), >= 0.
        num_classes: more than the largest class id (the model passes its number of labels); `None`: read from
            `predicted_class` (one host sync).

    Returns:
        `kept_index` `(batch, num_kept)` int64: the token indices that go on, in increasing order.
    """
    batch_size, num_tokens = confidence.shape
    # Both orders from one stable sort of (batch, 2, tokens) keys: least confident first, and most confident first
    # (the negated confidence); ties go to the earlier token in both, inactive tokens sort last in both.
    keys = torch.stack([confidence, confidence.neg()], dim=1)
    if active_mask is not None:
        keys = keys.masked_fill(~active_mask[:, None, :], float("inf"))
    order = keys.sort(dim=2, stable=True).indices  # (batch, 2, tokens): the token at each place
    # A token's place in an order (a permutation: scattering the positions by the order inverts it) is unique, so
    # every token gets a distinct integer priority and one `topk` picks exactly the kept tokens, with no tie left to
    # break. The smallest priorities go on.
    position = torch.arange(num_tokens, device=confidence.device).expand(batch_size, 2, -1)
    place = position.scatter(2, order, position)
    least_confident_place, most_confident_place = place.unbind(1)  # (batch, tokens) each, 0 = first
    # Non-context tokens, least confident first, rank after every context token (priorities from
    # (keep_top_k + 1) * tokens on; context priorities lie below).
    priority = least_confident_place + (keep_top_k + 1) * num_tokens
    if keep_top_k:
        if num_classes is None:
            num_classes = int(predicted_class.max()) + 1
        # A token's rank in its class, counted from 1: walking the most-confident-first order, how many tokens of its
        # class have come so far (a running count per class). Inactive tokens come last, after every active one.
        # Counting rather than a per-class top-k written back by a minimum-scatter: every scatter of this rule writes
        # each place once, so the export has no scatter reduction (TensorRT runs those only as a plugin).
        class_in_order = predicted_class.gather(1, order[:, 1])  # (batch, tokens): the class at each place
        classes = torch.arange(num_classes, device=confidence.device)
        seen = (class_in_order[:, None, :] == classes[:, None]).cumsum(dim=2)  # (batch, classes, tokens)
        rank_in_order = seen.gather(1, class_in_order[:, None, :]).squeeze(1)  # (batch, tokens), by place
        rank = rank_in_order.gather(1, most_confident_place)  # (batch, tokens), by token
        is_context = rank <= keep_top_k
        if active_mask is not None:
            is_context = is_context & active_mask
        # Context priority: rank by rank, then the more confident (the smaller place) first.
        priority = torch.where(is_context, rank * num_tokens + most_confident_place, priority)
    kept_index = priority.topk(num_kept, dim=1, largest=False).indices  # (batch, num_kept)
    return kept_index.topk(num_kept, dim=1, largest=False).values  # in increasing order


def update_canvas(canvas: torch.Tensor | None, head_values: torch.Tensor, packing: "TokenPacking") -> torch.Tensor:
    """Write a head's per-token values into the canvas for the tokens it saw; exited tokens keep theirs.

    Args:
        canvas: `(batch, tokens, num_labels)`, or `None` before the first head (which sees every token).
        head_values: `(total, num_labels)`, the head's values of the active tokens, packed as `packing`.
        packing: where the active tokens sit in the grid.

    Returns:
        The new canvas `(batch, tokens, num_labels)`.
    """
    if canvas is None:
        return packing.to_grid(head_values)
    flat = packing.write_rows(canvas.reshape(-1, canvas.shape[-1]), head_values)
    return flat.reshape(canvas.shape)


def tokens_to_grid(values: torch.Tensor, grid_size: tuple[int, int]) -> torch.Tensor:
    """`(batch, channels, tokens)` -> `(batch, channels, height, width)`, row-major tokens; contiguous (the canvas
    is token-major, so its channel-major views are copied once here, for the outputs)."""
    return values.contiguous().reshape(*values.shape[:-1], *grid_size)


def tokens_seen_per_stage(exit_stage: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Patch tokens each head processed: head k saw every token that had not exited before it (exit stage >= k).

    Args:
        exit_stage: `(batch, h, w)` int64, the head that finalised each token.
        num_stages: number of heads.

    Returns:
        `(batch, num_stages)` int64.
    """
    flat_stage = exit_stage.flatten(1)  # (batch, tokens)
    stages = torch.arange(num_stages, device=exit_stage.device)
    return (flat_stage[:, None, :] >= stages[None, :, None]).sum(dim=-1)


@dataclass
class TokenPacking:
    """Where the active tokens of a batch sit in the packed sequence and in a padded per-image layout.

    The packed sequence `(total, ...)` holds the active tokens of image 0 in token order, then image 1, ...; the
    padded layout `(batch, max_count, ...)` is what per-image attention needs. When every image has the same
    number of active tokens (no pruning yet, threshold 1.0, or capacity mode) the two layouts are the same memory
    and `is_uniform` is True: no copy and no attention mask are needed.

    Attributes:
        active_mask: `(batch, tokens)` bool.
        flat_index: `(total,)` int64, index of each packed token in the flattened `(batch * tokens)` grid.
        counts: `(batch,)` int64, active tokens per image.
        max_count: largest entry of `counts` (a Python int: it sizes the padded layout).
        padded_index: `(total,)` int64, index of each packed token in the flattened `(batch * max_count)` layout.
        slot_source: `(batch * max_count,)` int64, the packed row each padded slot is read from. Padding slots
            repeat a real row (the image's first, or row 0) instead of holding zeros: one gather fills the padded
            layout with no allocation-and-fill, and the key mask hides the repeats.
        key_padding_mask: `(batch, max_count)` bool, True at real tokens; `None` when `is_uniform`.
        cu_seqlens: `(batch + 1,)` int32, the packed row where each image starts, then `total` (the cumulative
            lengths of variable-length attention kernels).
        has_empty_image: True when some image has no active token left.
        token_index: `(batch, max_count)` int64, the grid token of each padded slot, when the packing was built from
            it (`dense`, `padded`); `None`: derived on demand (see `padded_token_index`).
        padding_rows: the packed sequence holds every padded slot, padding included (`padded`): every image has
            `max_count` rows, as in a uniform packing, and `key_padding_mask` says which rows are real.
    """

    active_mask: torch.Tensor
    flat_index: torch.Tensor
    counts: torch.Tensor
    max_count: int
    padded_index: torch.Tensor
    slot_source: torch.Tensor
    key_padding_mask: torch.Tensor | None
    cu_seqlens: torch.Tensor
    has_empty_image: bool = False
    token_index: torch.Tensor | None = None
    padding_rows: bool = False

    @classmethod
    def dense(cls, token_index: torch.Tensor, num_tokens: int) -> "TokenPacking":
        """The packing of the same number of active tokens in every image, from their token indices
        `(batch, count)` in increasing order per image (capacity mode); no host sync: every size is known."""
        batch_size, count = token_index.shape
        device = token_index.device
        # Scattered as integers, then made boolean: torch.compile's CPU backend (inductor, torch 2.13) miscompiles a
        # boolean scatter fused with the `where` that reads it (every token reads as inactive).
        active_mask = token_index.new_zeros(batch_size, num_tokens).scatter(1, token_index, 1).bool()
        image_start = torch.arange(0, batch_size * num_tokens, num_tokens, device=device)[:, None]  # (batch, 1)
        flat_index = (token_index + image_start).reshape(-1)  # (batch * count,)
        packed_order = torch.arange(batch_size * count, device=device)
        counts = token_index.new_full((batch_size,), count)
        cu_seqlens = torch.arange(0, (batch_size + 1) * count, count, dtype=torch.int32, device=device)
        packing = (active_mask, flat_index, counts, count, packed_order, packed_order, None, cu_seqlens)
        return cls(*packing, token_index=token_index)

    @classmethod
    def padded(cls, token_index: torch.Tensor, real_mask: torch.Tensor, active_mask: torch.Tensor) -> "TokenPacking":
        """The packing whose rows are every image's slots, padding included: `token_index` `(batch, slots)` the
        grid token each slot holds (the real ones first, in increasing order, then tokens that exited), `real_mask`
        `(batch, slots)` the slots of active tokens, `active_mask` `(batch, tokens)` the grid's. Threshold mode in an
        exported graph: the slot count, the batch's largest token count, is read from the data, and every other
        size follows from it, with no list per image."""
        # The layout of a dense packing of these slots (each image's run of rows starts at a multiple of the slot
        # count), with the grid's active tokens, the real slots' counts and the padding rows' key mask. Whether an
        # image has no active token left is only known at run time: `has_empty_image` takes the safe path.
        slots = cls.dense(token_index, active_mask.shape[1])
        return replace(
            slots,
            active_mask=active_mask,
            counts=real_mask.sum(dim=1),
            key_padding_mask=real_mask,
            has_empty_image=True,
            padding_rows=True,
        )

    def with_prefix(self, num_prefix_tokens: int) -> "TokenPacking":
        """The packing of the same tokens behind `num_prefix_tokens` prefix tokens that every image keeps, the
        layers' view of a dense or padded packing of patch tokens."""
        batch_size, device = self.batch_size, self.active_mask.device
        prefix = torch.arange(num_prefix_tokens, device=device).expand(batch_size, -1)  # (batch, prefix)
        token_index = torch.cat([prefix, self.token_index + num_prefix_tokens], dim=1)
        if not self.padding_rows:
            return TokenPacking.dense(token_index, num_prefix_tokens + self.num_tokens)
        prefix_mask = self.active_mask.new_ones(batch_size, num_prefix_tokens)
        real_mask = torch.cat([prefix_mask, self.key_padding_mask], dim=1)
        return TokenPacking.padded(token_index, real_mask, torch.cat([prefix_mask, self.active_mask], dim=1))

    @property
    def batch_size(self) -> int:
        return self.active_mask.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.active_mask.shape[1]

    @property
    def total(self) -> int:
        return self.flat_index.shape[0]

    @property
    def is_uniform(self) -> bool:
        return self.key_padding_mask is None

    @property
    def rows_are_slots(self) -> bool:
        """The packed sequence is the padded layout (uniform, or with its padding rows): no copy between them."""
        return self.is_uniform or self.padding_rows

    @property
    def is_complete(self) -> bool:
        """Every token of every image is active: the packed sequence is the whole grid. (Read from Python ints only,
        so that it holds for any batch size when the batch dimension is symbolic, as in an exported graph.)"""
        return self.is_uniform and self.max_count == self.num_tokens

    @property
    def row_image_index(self) -> torch.Tensor:
        """`(total,)` int64: the image each packed row belongs to."""
        return torch.div(self.flat_index, self.num_tokens, rounding_mode="floor")

    def to_padded(self, packed: torch.Tensor) -> torch.Tensor:
        """`(total, *feature)` -> `(batch, max_count, *feature)`; padding slots hold copies of real rows."""
        feature_shape = packed.shape[1:]
        if not self.rows_are_slots:
            packed = packed.index_select(0, self.slot_source)
        return packed.reshape(self.batch_size, self.max_count, *feature_shape)

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """`(batch, max_count, *feature)` -> `(total, *feature)`."""
        flat = padded.reshape(self.batch_size * self.max_count, *padded.shape[2:])
        if self.rows_are_slots:
            return flat
        return flat.index_select(0, self.padded_index)

    def to_grid(self, packed: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """`(total, *feature)` -> `(batch, tokens, *feature)`, `fill` at inactive tokens."""
        feature_shape = packed.shape[1:]
        if self.is_complete:
            return packed.reshape(self.batch_size, self.num_tokens, *feature_shape)
        grid = packed.new_full((self.batch_size * self.num_tokens, *feature_shape), fill)
        return self.write_rows(grid, packed).reshape(self.batch_size, self.num_tokens, *feature_shape)

    def write_rows(self, grid: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
        """`grid` `(batch * tokens, *feature)` with the rows of the active tokens replaced by `packed`
        `(total, *feature)`; out of place. One row copy: in ONNX a `ScatterND` of whole rows, several times faster
        than an element-wise scatter or a select over the whole grid. Padding rows write back what their token
        holds."""
        if self.padding_rows:
            real_rows = self.key_padding_mask.reshape(-1, *(1,) * (packed.dim() - 1))
            packed = torch.where(real_rows, packed, grid.index_select(0, self.flat_index))
        return grid.index_copy(0, self.flat_index, packed)

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """`(batch, tokens, *feature)` -> `(total, *feature)`: the active tokens only."""
        flat = grid.reshape(self.batch_size * self.num_tokens, *grid.shape[2:])
        if self.is_complete:
            return flat
        return flat.index_select(0, self.flat_index)

    def padded_token_index(self) -> torch.Tensor:
        """`(batch, max_count)` int64: the grid token index of each padded slot, `tokens` at padding slots."""
        if self.token_index is not None:  # a dense or padded packing keeps the indices it was built from
            if self.padding_rows:
                return self.token_index.masked_fill(~self.key_padding_mask, self.num_tokens)
            return self.token_index
        if self.is_uniform:  # the padded layout is the packed one: each row's token, read off its grid position
            return (self.flat_index % self.num_tokens).reshape(self.batch_size, self.max_count)
        slot_to_token = torch.full(
            (self.batch_size * self.max_count,), self.num_tokens, dtype=torch.long, device=self.flat_index.device
        )
        token_index = self.flat_index % self.num_tokens
        slot_to_token = slot_to_token.index_copy(0, self.padded_index, token_index)
        return slot_to_token.reshape(self.batch_size, self.max_count)

    def attention_to_grid(self, attn_weights: torch.Tensor) -> torch.Tensor:
        """Padded attention weights `(batch, heads, max_count, max_count)` -> `(batch, heads, tokens, tokens)`,
        zero for inactive queries and keys."""
        if self.is_complete:
            return attn_weights
        batch_size, num_heads = attn_weights.shape[:2]
        slot_token = self.padded_token_index()  # (batch, max_count), `tokens` at padding slots
        # One spare row and column collect the padding slots and are cut off afterwards.
        grid = attn_weights.new_zeros(batch_size, self.num_tokens + 1, self.num_tokens + 1, num_heads)
        batch_index = torch.arange(batch_size, device=grid.device)[:, None, None]
        grid[batch_index, slot_token[:, :, None], slot_token[:, None, :]] = attn_weights.permute(0, 2, 3, 1)
        return grid[:, :-1, :-1].permute(0, 3, 1, 2)


def true_positions(mask: torch.Tensor, count: int) -> torch.Tensor:
    """Positions of the True entries of a 1-D bool mask, in order, given how many there are.

    `nonzero` must read the count from the device (a host sync) to size its output; with the count known on the
    host, `nonzero_static` needs none.
    """
    return torch.nonzero_static(mask, size=count).squeeze(1)


def pack_tokens(active_mask: torch.Tensor, count_values: list[int] | None = None) -> TokenPacking:
    """Build the packing of the active tokens.

    Args:
        active_mask: `(batch, tokens)` bool.
        count_values: the active tokens per image as Python ints, when the caller already has them on the host;
            otherwise they are read from `active_mask` (one host sync: the padded length must be a Python int).
    """
    batch_size, num_tokens = active_mask.shape
    device = active_mask.device
    counts = active_mask.sum(dim=1)
    cu_seqlens = torch.cat([counts.new_zeros(1), counts.cumsum(dim=0)]).to(torch.int32)
    if count_values is None:
        count_values = counts.tolist()
    total, max_count = sum(count_values), max(count_values)
    if total == batch_size * num_tokens:
        flat_index = torch.arange(total, device=device)
    else:
        flat_index = true_positions(active_mask.reshape(-1), total)  # (total,), image-major then token order
    if min(count_values) == max_count:
        # Every image has the same number of active tokens: the packed sequence *is* the padded layout.
        packed_order = torch.arange(total, device=device)
        return TokenPacking(active_mask, flat_index, counts, max_count, packed_order, packed_order, None, cu_seqlens)
    first_row = counts.cumsum(dim=0) - counts  # (batch,) packed row of each image's first token
    slot = torch.arange(max_count, device=device)[None, :]  # (1, max_count)
    key_padding_mask = slot < counts[:, None]  # (batch, max_count)
    slot_source = (first_row[:, None] + torch.where(key_padding_mask, slot, 0)).clamp(max=max(total - 1, 0))
    image_index = torch.div(flat_index, num_tokens, rounding_mode="floor")
    position_in_image = torch.arange(total, device=device) - first_row.index_select(0, image_index)
    padded_index = image_index * max_count + position_in_image
    return TokenPacking(
        active_mask,
        flat_index,
        counts,
        max_count,
        padded_index,
        slot_source.reshape(-1),
        key_padding_mask,
        cu_seqlens,
        has_empty_image=min(count_values) == 0,
    )


def gather_rows(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The rows `rows` `(batch, kept)` of each image of a uniform packed sequence `(batch * count, *feature)` ->
    `(batch * kept, *feature)`. One `index_select` of whole rows (an ONNX `Gather`, not an element-wise one)."""
    batch_size = rows.shape[0]
    count = packed.shape[0] // batch_size
    image_start = torch.arange(0, batch_size * count, count, device=rows.device)[:, None]  # (batch, 1)
    return packed.index_select(0, (rows + image_start).reshape(-1))


@dataclass
class ActiveTokens:
    """The tokens still in the network after each stage, and their two packings.

    The backbone's sequence is `num_prefix_tokens` prefix tokens (class, distillation, register tokens: they
    never exit) followed by the patch tokens; the heads see the patch tokens only.

    Attributes:
        active_mask: `(batch, tokens)` bool, patch tokens still in the network.
        exit_stage: `(batch, tokens)` int64, the head that finalised each patch token (the decode head's index
            for tokens that have not exited).
        sequence: packing of the prefix tokens and the active patch tokens: what the layers see.
        patches: packing of the active patch tokens: what the heads see.
        num_prefix_tokens: prefix tokens per image.
    """

    active_mask: torch.Tensor
    exit_stage: torch.Tensor
    sequence: TokenPacking
    patches: TokenPacking
    num_prefix_tokens: int

    @classmethod
    def pack(
        cls, active_mask: torch.Tensor, exit_stage: torch.Tensor, count_values: list[int], num_prefix_tokens: int
    ) -> "ActiveTokens":
        """Both packings from the active patch tokens per image, known on the host (no sync)."""
        patches = pack_tokens(active_mask, count_values)
        if num_prefix_tokens == 0:
            return cls(active_mask, exit_stage, patches, patches, num_prefix_tokens)
        prefix_mask = active_mask.new_ones(active_mask.shape[0], num_prefix_tokens)
        sequence_mask = torch.cat([prefix_mask, active_mask], dim=1)  # (batch, prefix + tokens)
        sequence_counts = [count + num_prefix_tokens for count in count_values]
        sequence = pack_tokens(sequence_mask, sequence_counts)
        return cls(active_mask, exit_stage, sequence, patches, num_prefix_tokens)

    @classmethod
    def all_active(
        cls, batch_size: int, grid_size: tuple[int, int], num_prefix_tokens: int, num_stages: int, device: torch.device
    ) -> "ActiveTokens":
        """Every token active before the first layer; every exit stage the decode head's. Built from the sizes alone
        (no list per image), so that the batch size can stay symbolic in an exported graph."""
        num_tokens = grid_size[0] * grid_size[1]
        exit_stage = torch.full((batch_size, num_tokens), num_stages - 1, dtype=torch.long, device=device)
        patches = TokenPacking.dense(torch.arange(num_tokens, device=device).expand(batch_size, -1), num_tokens)
        sequence = patches.with_prefix(num_prefix_tokens) if num_prefix_tokens else patches
        return cls(patches.active_mask, exit_stage, sequence, patches, num_prefix_tokens)

    def patch_rows(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`(sequence.total, dim)` -> `(patches.total, dim)`: the packed patch tokens, without the prefix tokens."""
        if self.num_prefix_tokens == 0:
            return hidden_states
        if self.sequence.rows_are_slots:
            # Every image has the same rows: (batch, prefix + count, dim) -> (batch, count, dim), a slice.
            per_image = hidden_states.reshape(self.sequence.batch_size, self.sequence.max_count, -1)
            return per_image[:, self.num_prefix_tokens :].reshape(self.patches.total, -1)
        # Image i's prefix rows come first in its run: patch row j of the heads' packing is sequence row
        # j + (i + 1) * num_prefix_tokens.
        rows = torch.arange(self.patches.total, device=hidden_states.device)
        rows = rows + (self.patches.row_image_index + 1) * self.num_prefix_tokens
        return hidden_states.index_select(0, rows)

    @torch.compiler.disable
    def after_exit(
        self,
        exit_mask: torch.Tensor | None,
        stage: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple["ActiveTokens", torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Let the tokens of `exit_mask` `(batch, tokens)` exit after head `stage`: new packings, and the packed
        `hidden_states` `(total, dim)` (and rotary `position_embeddings`, each `(total, head_dim)`) without their
        rows.

        One host sync (the new token counts size the packed sequence); none when `exit_mask` is `None`
        (threshold 1.0), and no copy when nothing exited. Under `torch.compile` this bookkeeping runs eagerly (it is
        small, and its sizes come from the host sync), and the token dimension of what it returns is marked
        dynamic, so that the compiled layers and heads that follow serve every token count without recompiling.
        """
        if exit_mask is None:
            return self, hidden_states, position_embeddings
        active_mask = self.active_mask & ~exit_mask
        count_values = active_mask.sum(dim=1).tolist()  # the stage's one host sync
        if sum(count_values) == self.patches.total:
            return self, hidden_states, position_embeddings
        exit_stage = self.exit_stage.masked_fill(exit_mask, stage)
        tokens = ActiveTokens.pack(active_mask, exit_stage, count_values, self.num_prefix_tokens)
        # (old_total,) True for the rows of tokens that are still active, in the old packed order.
        still_active = tokens.sequence.active_mask.reshape(-1).index_select(0, self.sequence.flat_index)
        kept_rows = true_positions(still_active, tokens.sequence.total)
        hidden_states = hidden_states.index_select(0, kept_rows)
        if position_embeddings is not None:
            position_embeddings = tuple(values.index_select(0, kept_rows) for values in position_embeddings)
        token_sized = [hidden_states, *(position_embeddings or ())]
        for packing in (tokens.sequence, tokens.patches):
            token_sized += [packing.flat_index, packing.padded_index, packing.slot_source]
        for tensor in token_sized:
            torch._dynamo.maybe_mark_dynamic(tensor, 0)
        return tokens, hidden_states, position_embeddings

    def keep(
        self,
        kept_rows: torch.Tensor | None,
        stage: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple["ActiveTokens", torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Capacity mode: only the patch tokens at rows `kept_rows` `(batch, kept)` of every image's run in the
        heads' packing go on after head `stage`; every other active token exits. Returns the new tokens and the
        rows of the packed `hidden_states` `(batch * kept_with_prefix, dim)` (and rotary `position_embeddings`) that
        go on.

        `kept_rows` is in increasing order (see [`select_kept_tokens`], which the model runs on these rows), `None`
        when every token goes on. Every image keeps the same number of tokens, so the packings are dense: one
        gather moves the hidden states, with no host sync and no data-dependent size (a static-shape graph for
        torch.compile and ONNX). The current packing must be dense too, as capacity mode keeps it.
        """
        if kept_rows is None:
            return self, hidden_states, position_embeddings
        # Rows hold the active tokens in token order, so the kept token indices stay in increasing order.
        kept_index = self.patches.padded_token_index().gather(1, kept_rows)  # (batch, kept)
        patches = TokenPacking.dense(kept_index, self.active_mask.shape[1])
        # The active tokens that did not go on exit at `stage`; tokens that exited before keep their smaller stage.
        exit_stage = torch.where(patches.active_mask, self.exit_stage, self.exit_stage.clamp(max=stage))
        return self.go_on(kept_rows, patches, exit_stage, hidden_states, position_embeddings)

    def after_exit_padded(
        self,
        exit_mask: torch.Tensor | None,
        stage: int,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple["ActiveTokens", torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """Threshold mode in an exported graph: what [`after_exit`] does, with every image padded to as many slots
        as the batch's image with the most active tokens left. Padding slots hold tokens that exited: the key mask
        hides them from attention and the canvas keeps their values, so each image's result is threshold mode's,
        while the one size read from the data (the slot count) lets `torch.export` trace it with a symbolic batch
        (where [`after_exit`] needs one count per image on the host). Works from a dense or padded packing.
        """
        if exit_mask is None:
            return self, hidden_states, position_embeddings
        active_mask = self.active_mask & ~exit_mask
        slot_token = self.patches.token_index  # (batch, slots): each slot's token, padding slots included
        slot_active = active_mask.gather(1, slot_token)
        # At least two slots (as many as there are, if fewer): no tensor is empty when every token of the batch exits,
        # and transformers' sdpa wrapper, which asks whether a query has more than one row, can tell when tracing.
        min_slots = min(2, slot_token.shape[1])
        num_slots = slot_active.sum(dim=1).max().clamp(min=min_slots).item()  # the stage's size read from the data
        torch._check(num_slots >= min_slots)
        torch._check(num_slots <= slot_token.shape[1])
        # The active slots first, in slot order (so in token order), then slots of exited tokens as padding.
        kept_rows = slot_active.logical_not().long().sort(dim=1, stable=True).indices[:, :num_slots]
        patches = TokenPacking.padded(slot_token.gather(1, kept_rows), slot_active.gather(1, kept_rows), active_mask)
        exit_stage = self.exit_stage.masked_fill(exit_mask, stage)
        return self.go_on(kept_rows, patches, exit_stage, hidden_states, position_embeddings)

    def go_on(
        self,
        kept_rows: torch.Tensor,
        patches: TokenPacking,
        exit_stage: torch.Tensor,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> tuple["ActiveTokens", torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
        """The tokens of `patches`, the rows `kept_rows` `(batch, kept)` of every image's run in the current heads'
        packing, go on (`keep`, `after_exit_padded`): the new tokens, and the rows of the packed `hidden_states`
        (and rotary `position_embeddings`) that go on, moved by one gather."""
        sequence, sequence_rows = patches, kept_rows
        if self.num_prefix_tokens:
            # The prefix tokens lead every image's rows and never exit.
            sequence = patches.with_prefix(self.num_prefix_tokens)
            prefix_rows = sequence.token_index[:, : self.num_prefix_tokens]
            sequence_rows = torch.cat([prefix_rows, kept_rows + self.num_prefix_tokens], dim=1)
        hidden_states = gather_rows(hidden_states, sequence_rows)
        if position_embeddings is not None:
            position_embeddings = tuple(gather_rows(values, sequence_rows) for values in position_embeddings)
        tokens = ActiveTokens(patches.active_mask, exit_stage, sequence, patches, self.num_prefix_tokens)
        return tokens, hidden_states, position_embeddings


__all__ = [
    "ActiveTokens",
    "TokenPacking",
    "atm_class_scores",
    "gather_rows",
    "num_tokens_kept",
    "pack_tokens",
    "rank_within_class",
    "select_exiting_tokens",
    "select_kept_tokens",
    "token_confidence",
    "tokens_seen_per_stage",
    "tokens_to_grid",
    "true_positions",
    "update_canvas",
]
