"""Fused input projections for the compiled path's fixed-shape forwards.

A Llama-style layer multiplies one input by several matrices: q, k and v in attention, gate and up in
the MLP. Five products a layer (an 8B forward launches 160 of them) become two when each group's
weights sit in one matrix: :func:`fuse_weights` lays them out that way once (the modules' own weights
become consecutive views of it, so no memory is added and every other forward reads the same
numbers), and inside :func:`fused_projections` the group's first call computes one product for all
and the others take their slices of it. There Llama's rotary embedding, where q and k are two slices
of one product, also runs once over both (the same arithmetic; 4 kernels a layer instead of 10). Only groups of
plain ``nn.Linear`` modules that own their weights are fused (not LoRA layers, quantized or sharded
weights, or modules with hooks); the rest keep their own forward.
:class:`~dllm_lit.compiled.StaticForward` uses it for its own passes only.
"""

from __future__ import annotations

import functools
import inspect
import sys
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from transformers.models.llama import modeling_llama

from dllm_lit.attention import PassMemo

GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Sibling projections that read the same input, in the order a Llama-style forward calls them."""


class Group:
    """Linear modules over one input whose weights (and biases) are slices of one matrix."""

    def __init__(self, owner: torch.nn.Module, members: list[torch.nn.Linear]):
        self.owner = owner  # the attention or MLP module that calls the members
        self.members = members
        self.sizes = [member.out_features for member in members]
        self.weight = _concatenate(members, "weight", self.sizes)
        self.bias = _concatenate(members, "bias", self.sizes) if members[0].bias is not None else None
        self.input: torch.Tensor | None = None  # the input of the product below, while a pass runs
        self.outputs: tuple[torch.Tensor, ...] = ()

    def matrices(self) -> list[torch.Tensor]:
        return [self.weight] + ([self.bias] if self.bias is not None else [])

    def intact(self) -> bool:
        """Whether the members still read this group's matrix (``model.to`` and loads replace it)."""
        return all(
            getattr(member, name).data_ptr() == view.data_ptr()
            for name, whole in (("weight", self.weight), ("bias", self.bias))
            if whole is not None
            for member, view in zip(self.members, whole.split(self.sizes))
        )

    def output(self, index: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """Member ``index``'s output: its slice of one product over ``hidden_states``."""
        if self.input is not hidden_states:
            self.input = hidden_states
            self.outputs = F.linear(hidden_states, self.weight, self.bias).split(self.sizes, -1)
        return self.outputs[index]


def _concatenate(members: list[torch.nn.Linear], name: str, sizes: list[int]) -> torch.Tensor:
    """One tensor holding the members' ``name`` parameters, which become views of it."""
    tensors = [getattr(member, name).detach() for member in members]
    # Made as the parameters were: normal ones stay usable for training (inside inference mode too).
    with torch.inference_mode(tensors[0].is_inference()), torch.no_grad():
        whole = torch.cat(tensors)
    for member, view in zip(members, whole.split(sizes)):
        getattr(member, name).data = view
    return whole


def _owns_its_tensors(module: torch.nn.Module, ours: set[int]) -> bool:
    """A plain, hook-free linear layer whose weight and bias are whole tensors of their own (or
    slices of a matrix this module laid out: storages ``ours``)."""
    if type(module) is not torch.nn.Linear or module._forward_hooks or module._forward_pre_hooks:
        return False
    if hasattr(module, "_hf_hook"):  # accelerate offloading moves weights in a hook
        return False
    tensors = [t for t in (module.weight, module.bias) if t is not None]
    return all(
        type(t.data) is torch.Tensor
        and t.device.type != "meta"
        and t.is_contiguous()
        and (t.untyped_storage().nbytes() == t.numel() * t.element_size() or t.untyped_storage().data_ptr() in ours)
        for t in tensors
    )


def _fusable(members: list[torch.nn.Module], ours: set[int]) -> bool:
    first = members[0]
    return (
        all(_owns_its_tensors(member, ours) for member in members)
        and all(member.in_features == first.in_features for member in members)
        and all((member.bias is None) == (first.bias is None) for member in members)
        and len({(member.weight.device, member.weight.dtype) for member in members}) == 1
    )


_GROUPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> its fused groups


def fuse_weights(model: torch.nn.Module) -> list[Group]:
    """Lay out ``model``'s sibling projections as fused groups (once; a group again if its weights
    were replaced since: the others stay where captured graphs read them) and return the groups."""
    groups = _GROUPS.get(model)
    if groups is not None and all(group.intact() for group in groups):
        return groups
    earlier, groups = groups or [], []
    kept = {tuple(map(id, group.members)): group for group in earlier if group.intact()}
    ours = {whole.untyped_storage().data_ptr() for group in earlier for whole in group.matrices()}
    for module in model.modules():
        for names in GROUPS:
            members = [getattr(module, name, None) for name in names]
            if all(isinstance(member, torch.nn.Module) for member in members):
                group = kept.get(tuple(map(id, members)))
                if group is None and _fusable(members, ours):
                    group = Group(module, members)
                groups += [group] if group is not None else []
    _GROUPS[model] = groups
    return groups


def rotate_adjacent(original, q, k, cos, sin, unsqueeze_dim=1):
    """Llama's ``apply_rotary_pos_emb``, computed once over q's and k's heads where k's follow q's in
    each row of one product (``[batch, heads, length, dim]`` views of ``[batch, length, n]``)."""
    batch, heads, length, dim = q.shape
    q_strides, k_strides = _strides(q), _strides(k)
    adjacent = (
        unsqueeze_dim == 1
        and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
        and k.storage_offset() == q.storage_offset() + heads * dim
        and (k.shape[0], k.shape[2], k.shape[3]) == (batch, length, dim)
        and (q_strides[0], q_strides[2]) == (k_strides[0], k_strides[2])
        and all(strides[1] in (dim, None) and strides[3] in (1, None) for strides in (q_strides, k_strides))
    )
    if not adjacent:
        return original(q, k, cos, sin, unsqueeze_dim)
    both = q.as_strided((batch, length, heads + k.shape[1], dim), (q.stride(0), q.stride(2), dim, 1))
    half = dim // 2  # rotate_half(both) is swapped * [-1 .. -1, 1 .. 1] (torch.roll would copy the strided view)
    swapped = torch.cat([both[..., half:], both[..., :half]], -1)
    rotated = (both * cos.unsqueeze(2)) + (swapped * signed_sin(sin).unsqueeze(2))
    return rotated[:, :, :heads].transpose(1, 2), rotated[:, :, heads:].transpose(1, 2)


def _strides(tensor: torch.Tensor) -> list[int | None]:
    """The tensor's strides, None on axes of length one (whose stride means nothing: a view of a
    one-token product may report any)."""
    return [stride if size > 1 else None for size, stride in zip(tensor.shape, tensor.stride())]


_SIGNED_SINS = PassMemo()


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, made once a pass: ``rotate_half(x) * sin`` is then ``x``'s
    halves swapped times ``signed_sin(sin)``, the same products (a sign flip is exact) without
    rotate_half's ``neg``."""
    half = sin.shape[-1] // 2
    return _SIGNED_SINS.get(sin, lambda: torch.cat([-sin[..., :half], sin[..., half:]], -1))


@functools.cache
def _has_llamas_rotary(module_name: str) -> bool:
    """Whether the modeling module ``module_name`` rotates with Llama's ``apply_rotary_pos_emb``."""
    function = getattr(sys.modules[module_name], "apply_rotary_pos_emb", None)
    try:
        return inspect.getsource(function) == inspect.getsource(modeling_llama.apply_rotary_pos_emb)
    except (OSError, TypeError):
        return False


@contextmanager
def fused_projections(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """Run each fused group of ``model`` (:func:`fuse_weights`) as one product, and Llama's rotary
    embedding over q and k at once (:func:`rotate_adjacent`), inside the block (a graph captured there
    keeps them); restore the members' own forward and the rotary function after. Not for
    ``torch.compile``: the swap is made anew on each entry, which its guards would see as new."""
    groups = fuse_weights(model) if enabled else []
    for group in groups:
        for index, member in enumerate(group.members):
            member.forward = functools.partial(group.output, index)
    names = {type(group.owner).__module__ for group in groups}
    modules = [sys.modules[name] for name in sorted(names) if _has_llamas_rotary(name)]
    originals = [module.apply_rotary_pos_emb for module in modules]
    for module, original in zip(modules, originals):
        module.apply_rotary_pos_emb = functools.partial(rotate_adjacent, original)
    try:
        yield
    finally:
        for module, original in zip(modules, originals):
            module.apply_rotary_pos_emb = original
        _SIGNED_SINS.clear()
        for group in groups:
            group.input, group.outputs = None, ()
            for member in group.members:
                del member.forward
