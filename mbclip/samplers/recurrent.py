"""``nn.LSTM``, ``nn.GRU`` and ``nn.RNN`` as users write them: exact micro-batch gradients, whole sequences at once.

While a model is wrapped, each recurrent layer runs :func:`recording_forward`: the same native kernels
(``torch._VF``), one layer at a time, so that every layer's input and output and the inter-layer dropout
masks actually used are known. In backward the sampler recomputes all gate pre-activations of a layer in
two batched matmuls, runs one backward-through-time with one matmul per step to get the gate gradients
``dG_t`` of every sample and step, and contracts them with the inputs and previous hidden states once per
weight over each micro-batch: memory ``M x params``, never ``B x params``, and no per-step weight gradients.
On the sampler-only path (weights switched off) the layer is one autograd node, :class:`_SampledRecurrence`, whose
backward takes the input and initial-state gradients from that same backward through time: the native kernel's
backward does not run as well.

Packed sequences are unpacked to padded, time-major, *batch-order* tensors with a validity mask, so
per-sample rows follow the user's batch order whatever ``enforce_sorted`` was.

With few micro-batches (at most :data:`MAX_LOOPED_MICROBATCHES`, a padded input, no dropout between layers) the
layer instead runs the class's native kernel once per micro-batch, on its slice of the batch, with its weights
behind a per-micro-batch identity: the native backward then gives each micro-batch's weight gradients itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import _VF, nn
from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

from mbclip.errors import BatchError
from mbclip.layout import MicroBatchLayout
from mbclip.microbatch_sums import LOW_PRECISION, outer_product_sums
from mbclip.samplers.registry import LayerCall, register_microbatch_sampler, take_forward_mark, watch

RECORD_ATTRIBUTE = "_mbclip_recurrent_record"

NATIVE_KERNELS = {"LSTM": _VF.lstm, "GRU": _VF.gru, "RNN_TANH": _VF.rnn_tanh, "RNN_RELU": _VF.rnn_relu}


@dataclass
class RecurrentRecord:
    """What one training forward of a recurrent layer used, every tensor detached.

    ``layer_inputs`` / ``layer_outputs``: per layer, time-major ``[T, B, *]`` or packed data;
    ``dropout_scales[l]``: the factor (mask / (1 - p)) applied to layer ``l``'s output to form layer
    ``l + 1``'s input, ``None`` without dropout. ``h0`` / ``c0``: initial states in batch order.
    """

    layer_inputs: List[torch.Tensor]
    layer_outputs: List[torch.Tensor]
    dropout_scales: List[Optional[torch.Tensor]]
    h0: torch.Tensor
    c0: Optional[torch.Tensor]
    batch_sizes: Optional[torch.Tensor]
    sorted_indices: Optional[torch.Tensor]
    unsorted_indices: Optional[torch.Tensor]
    # on the sampler-only path (a _SampledRecurrence node): which of (input, h0, c0) need a gradient, and the
    # sampler's (graph task, (d input, d h0, d c0)) for the node's backward
    input_grads_needed: Optional[Tuple[bool, ...]] = None
    input_grads: Optional[Tuple[int, Tuple[Optional[torch.Tensor], ...]]] = None

    @property
    def packed(self) -> bool:
        return self.batch_sizes is not None

    def padded(self, data: torch.Tensor) -> torch.Tensor:
        """``[T, B, *]`` in batch order (packed data unpacked, zeros past each sequence's end)."""
        if not self.packed:
            return data
        sequence = PackedSequence(data, self.batch_sizes, self.sorted_indices, self.unsorted_indices)
        return pad_packed_sequence(sequence)[0]

    def repacked(self, padded: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`padded`: packed data from ``[T, B, *]`` in batch order."""
        if not self.packed:
            return padded
        if self.sorted_indices is not None:
            padded = padded.index_select(1, self.sorted_indices.to(padded.device))
        batch_sizes = self.batch_sizes.to(padded.device)
        inside = torch.arange(padded.shape[1], device=padded.device).unsqueeze(0) < batch_sizes.unsqueeze(1)
        return padded[inside]  # row-major over [T, B]: step by step, the sorted sequences still running

    def valid_steps(self, device) -> Optional[torch.Tensor]:
        """``[T, B, 1]`` bool: step ``t`` lies inside sequence ``b`` (batch order); ``None`` when all do."""
        if not self.packed:
            return None
        batch_sizes = self.batch_sizes.to(device)
        sorted_positions = torch.arange(int(batch_sizes[0]), device=device)
        valid = batch_sizes.unsqueeze(1) > sorted_positions.unsqueeze(0)  # [T, B] in sorted order
        if self.unsorted_indices is not None:
            valid = valid[:, self.unsorted_indices.to(device)]
        return valid.unsqueeze(-1)


def _initial_states(module: nn.RNNBase, hx, batch: int, like: torch.Tensor):
    """``(h0, c0)`` in batch order, as ``nn.LSTM.forward`` builds them (zeros without ``hx``; ``c0`` is ``None``
    for GRU and RNN)."""
    directions = 2 if module.bidirectional else 1
    real_hidden = module.proj_size if getattr(module, "proj_size", 0) > 0 else module.hidden_size
    is_lstm = module.mode == "LSTM"
    if hx is None:
        h0 = like.new_zeros((module.num_layers * directions, batch, real_hidden))
        c0 = like.new_zeros((module.num_layers * directions, batch, module.hidden_size)) if is_lstm else None
        return h0, c0
    return hx if is_lstm else (hx, None)


def _kernel_states(module: nn.RNNBase, h0: torch.Tensor, c0: Optional[torch.Tensor], sorted_indices):
    """``hx`` as the native kernel takes it: in the packed batch's sorted order, a pair for the LSTM."""
    if sorted_indices is not None:
        h0 = h0.index_select(1, sorted_indices)
        c0 = c0.index_select(1, sorted_indices) if c0 is not None else None
    return (h0, c0) if module.mode == "LSTM" else h0


def recording_forward(module: nn.RNNBase, input, hx=None):
    """The layer's forward with its own kernels, one layer at a time, recording what the sampler needs.

    Outside training (or without grad, on an unbatched input, or in a batch whose gradient autograd computes whole)
    it is the class's own forward. When none of the layer's weights requires grad (mbclip's sampler-only path), the
    layers run as one :class:`_SampledRecurrence` node, whose backward is the sampler's own backward through time:
    one pass, not the native kernel's and the sampler's.
    """
    packed = isinstance(input, PackedSequence)
    records = module.training and torch.is_grad_enabled() and (packed or input.dim() == 3)
    mark = take_forward_mark(module)
    if mark.class_forward or not records:
        return type(module).forward(module, input, hx)
    if not packed and loops_over_microbatches(module, input, mark.layout):
        return _looped_forward(module, input, hx, mark.layout)
    if packed:
        data, batch_sizes, sorted_indices, unsorted_indices = input
        batch = int(batch_sizes[0])
        layer_input = data
    else:
        batch_sizes = sorted_indices = unsorted_indices = None
        layer_input = input.transpose(0, 1) if module.batch_first else input
        batch = layer_input.shape[1]
    is_lstm = module.mode == "LSTM"
    h0, c0 = _initial_states(module, hx, batch, layer_input)
    module.check_forward_args(data if packed else input, _kernel_states(module, h0, c0, sorted_indices), batch_sizes)
    packing = (batch_sizes, sorted_indices, unsorted_indices)
    if any(weight.requires_grad for weight in module._flat_weights):  # autograd differentiates the native kernels
        output, h_n, c_n, record = _run_layers(module, layer_input, h0, c0, packing)
    else:
        holder: List[RecurrentRecord] = []
        results = _SampledRecurrence.apply(module, holder, packing, layer_input, h0, c0)
        output, h_n, c_n = results if is_lstm else (*results, None)
        record = holder[0]
    if packed:
        result_output = PackedSequence(output, batch_sizes, sorted_indices, unsorted_indices)
        setattr(output, RECORD_ATTRIBUTE, record)
    else:
        result_output = output.transpose(0, 1) if module.batch_first else output
        setattr(result_output, RECORD_ATTRIBUTE, record)
    return result_output, ((h_n, c_n) if is_lstm else h_n)


def _run_layers(module: nn.RNNBase, layer_input: torch.Tensor, h0, c0, packing, replayed_scales=None):
    """The native kernel layer by layer, dropout between layers drawn here (or replayed from ``replayed_scales``):
    ``(output, h_n, c_n, record)``, the output time-major (or packed data) and the final states in batch order."""
    batch_sizes, sorted_indices, unsorted_indices = packing
    kernel_hx = _kernel_states(module, h0, c0, sorted_indices)
    is_lstm = module.mode == "LSTM"
    kernel = NATIVE_KERNELS[module.mode]
    directions = 2 if module.bidirectional else 1
    weights = module._flat_weights
    per_layer = len(weights) // module.num_layers
    inputs, outputs, recorded_scales, last_h, last_c = [], [], [], [], []
    for layer in range(module.num_layers):
        rows = slice(layer * directions, (layer + 1) * directions)
        layer_hx = [kernel_hx[0][rows], kernel_hx[1][rows]] if is_lstm else kernel_hx[rows]
        layer_weights = weights[layer * per_layer : (layer + 1) * per_layer]
        if batch_sizes is not None:
            result = kernel(
                layer_input, batch_sizes, layer_hx, layer_weights, module.bias, 1, 0.0, True, module.bidirectional
            )
        else:
            result = kernel(
                layer_input, layer_hx, layer_weights, module.bias, 1, 0.0, True, module.bidirectional, False
            )
        output = result[0]
        last_h.append(result[1])
        if is_lstm:
            last_c.append(result[2])
        inputs.append(layer_input.detach())
        outputs.append(output.detach())
        if layer < module.num_layers - 1 and module.dropout > 0:
            keep = 1.0 - module.dropout
            if replayed_scales is not None:
                scale = replayed_scales[layer]
            elif keep > 0:
                scale = torch.empty_like(output).bernoulli_(keep).div_(keep)
            else:
                scale = torch.zeros_like(output)
            recorded_scales.append(scale)
            layer_input = output * scale
        else:
            recorded_scales.append(None)
            layer_input = output
    h_n = torch.cat(last_h, dim=0)
    c_n = torch.cat(last_c, dim=0) if is_lstm else None
    if unsorted_indices is not None:
        h_n = h_n.index_select(1, unsorted_indices)
        c_n = c_n.index_select(1, unsorted_indices) if is_lstm else None
    record = RecurrentRecord(
        inputs,
        outputs,
        recorded_scales,
        h0.detach(),
        c0.detach() if c0 is not None else None,
        batch_sizes,
        sorted_indices,
        unsorted_indices,
    )
    return layer_input, h_n, c_n, record


class _SampledRecurrence(torch.autograd.Function):
    """The recurrent layer as one node whose backward is the sampler's backward through time (weights switched off).

    The sampler runs first (the layer's keeper node delivers the outputs' gradients before this node's backward)
    and leaves the input and initial-state gradients it computed along the way on the record, tagged with the
    backward's graph task; a backward that did not run the sampler (``torch.autograd.grad`` on the inputs, say)
    computes them here the same way.
    """

    @staticmethod
    def forward(ctx, module, holder, packing, layer_input, h0, c0):
        output, h_n, c_n, record = _run_layers(module, layer_input, h0, c0, packing)
        record.input_grads_needed = ctx.needs_input_grad[3:]
        holder.append(record)
        ctx.module = module
        ctx.record = record
        ctx.packing = packing
        # the same storage as the record's tensors; only a create_graph backward reads them
        ctx.save_for_backward(layer_input, h0, c0)
        ctx.set_materialize_grads(False)
        return (output, h_n, c_n) if c_n is not None else (output, h_n)

    @staticmethod
    def backward(ctx, grad_output, grad_hn, grad_cn=None):
        record = ctx.record
        stash, record.input_grads = record.input_grads, None
        if torch.is_grad_enabled():  # create_graph=True: a backward that must itself be differentiable
            inputs = ctx.saved_tensors
            input_grads = _differentiable_input_grads(
                ctx.module, record, ctx.packing, inputs, (grad_output, grad_hn, grad_cn)
            )
        elif stash is not None and stash[0] == torch._C._current_graph_task_id():
            input_grads = stash[1]
        else:
            _, input_grads = backward_through_layers(ctx.module, record, grad_output, grad_hn, grad_cn, None)
        return (None, None, None) + input_grads


def _differentiable_input_grads(module: nn.RNNBase, record: RecurrentRecord, packing, inputs, grads):
    """The input and initial-state gradients as a graph (``create_graph=True``, e.g. for a gradient penalty): the
    native kernels re-run on the node's own inputs (``inputs``, from its saved tensors, so the graph goes on through
    them) with the recorded dropout factors, and autograd differentiates them.

    The graph reaches the layer's weights, so a loss built from these gradients gives the weights gradients that no
    sampler split; the step refuses them by name, as for every other layer."""
    needed = record.input_grads_needed
    with torch.enable_grad():
        outputs = _run_layers(module, *inputs, packing, replayed_scales=record.dropout_scales)[:3]
        pairs = [(out, grad) for out, grad in zip(outputs, grads) if out is not None and grad is not None]
        if not pairs:  # no output got a gradient
            return (None,) * len(needed)
        wanted = [tensor for tensor, need in zip(inputs, needed) if need]
        found = torch.autograd.grad(
            [out for out, _ in pairs], wanted, [grad for _, grad in pairs], create_graph=True, allow_unused=True
        )
    found = iter(found)
    return tuple(next(found) if need else None for need in needed)


# -- few micro-batches: the native kernel once per micro-batch -------------------------------------

# On CPU, up to eight native passes over slices of the batch cost less than the recorded path's own backward through
# time (an LSTM 2x256, B = 32: 1.1x / 1.25x / 1.4x a plain step at b = 16 / 8 / 4, against 1.6x); sixteen do not.
# The formed sums are M x the layer's parameters, allowed up to twice the gate activations autograd keeps. On other
# devices (unmeasured: no GPU was lent to this project yet) at most two, as a GPU kernel's time hardly shrinks with the
# batch.
MAX_LOOPED_MICROBATCHES = 8
MAX_LOOPED_MICROBATCHES_OFF_CPU = 2
_GATES = {"LSTM": 4, "GRU": 3, "RNN_TANH": 1, "RNN_RELU": 1}


@dataclass(frozen=True)
class LoopedRecord:
    """A forward run once per micro-batch: the watched tensors are the weights' identities, micro-batch by
    micro-batch, each in the order of ``module._flat_weights``."""

    num_microbatches: int


class _WeightTap(torch.autograd.Function):
    """Identity on a weight, one per micro-batch: the gradient it receives is that micro-batch's weight gradient
    (watched for the sampler), passed on to the weight itself when it requires grad (checked steps)."""

    @staticmethod
    def forward(ctx, anchor: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return weight.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def loops_over_microbatches(module: nn.RNNBase, input: torch.Tensor, layout: Optional[MicroBatchLayout]) -> bool:
    """Few micro-batches of a padded batch, without dropout between layers (whose masks the loop would draw anew),
    whose formed sums take at most twice the memory of the layer's gate activations."""
    most = MAX_LOOPED_MICROBATCHES
    if input.device.type != "cpu":
        most = min(most, MAX_LOOPED_MICROBATCHES_OFF_CPU)
    if layout is None or module.dropout > 0 or layout.num_microbatches > most:
        return False
    if input.shape[0 if module.batch_first else 1] != layout.batch_size:
        return False
    directions = 2 if module.bidirectional else 1
    gates = input.shape[0] * input.shape[1] * module.hidden_size * _GATES[module.mode] * module.num_layers * directions
    params = sum(weight.numel() for weight in module._flat_weights)
    return (layout.num_microbatches - 1) * params <= 2 * gates


def _looped_forward(module: nn.RNNBase, input: torch.Tensor, hx, layout: MicroBatchLayout):
    """The class's forward, once per micro-batch's slice of the batch, each call on its own tapped weights."""
    is_lstm = module.mode == "LSTM"
    batch_dim = 0 if module.batch_first else 1
    h0, c0 = _initial_states(module, hx, layout.batch_size, input)
    module.check_forward_args(input, _kernel_states(module, h0, c0, None), None)
    kernel = NATIVE_KERNELS[module.mode]
    anchor = input.new_zeros((), requires_grad=True)  # makes the taps require grad when the weights are off
    outputs, last_h, last_c, taps = [], [], [], []
    for samples in layout.microbatch_slices():
        weights = [_WeightTap.apply(anchor, w) for w in module._flat_weights]
        taps.extend(weights)
        part = input[samples] if module.batch_first else input[:, samples]
        part_hx = [h0[:, samples], c0[:, samples]] if is_lstm else h0[:, samples]
        result = kernel(
            part, part_hx, weights, module.bias, module.num_layers, 0.0, True, module.bidirectional, module.batch_first
        )
        outputs.append(result[0])
        last_h.append(result[1])
        if is_lstm:
            last_c.append(result[2])
    output = torch.cat(outputs, dim=batch_dim)
    h_n = torch.cat(last_h, dim=1)
    setattr(output, RECORD_ATTRIBUTE, LoopedRecord(layout.num_microbatches))
    watch(output, taps)
    return output, ((h_n, torch.cat(last_c, dim=1)) if is_lstm else h_n)


def _looped_sums(module: nn.RNNBase, call: LayerCall, record: LoopedRecord) -> Dict[nn.Parameter, torch.Tensor]:
    """``[M, *p.shape]`` per weight, stacked from the taps' gradients."""
    weights = module._flat_weights
    grads = call.watched_grads
    result = {}
    for index, weight in enumerate(weights):
        if not weight.requires_grad:
            continue
        parts = [grads[m * len(weights) + index] for m in range(record.num_microbatches)]
        parts = [torch.zeros_like(weight) if g is None else g for g in parts]
        summed = torch.stack(parts)
        result[weight] = summed.float() if summed.dtype in LOW_PRECISION else summed
    return result


# -- backward through time -------------------------------------------------------------------------


@dataclass
class DirectionGradients:
    """Per-sample, per-step gradients of one direction of one layer (zero past each sequence's end)."""

    gates_input: torch.Tensor  # dG of the input projection, [T, B, G]
    gates_hidden: torch.Tensor  # dG of the hidden projection, [T, B, G]
    hidden_prev: torch.Tensor  # h_{t-1} the hidden projection saw, [T, B, H_out]
    projection: Optional[Tuple[torch.Tensor, torch.Tensor]] = None  # LSTM proj_size: (dh_t, o_t * tanh(c_t))
    grad_h0: Optional[torch.Tensor] = None  # d h0 and (LSTM) d c0, [B, *]: what backward through time leaves
    grad_c0: Optional[torch.Tensor] = None


def _previous_hidden(output: torch.Tensor, h0: torch.Tensor, reverse: bool, valid: torch.Tensor) -> torch.Tensor:
    """``h_{t-1}`` in processing order for every step: the shifted output, ``h0`` at each sequence's first step."""
    if not reverse:
        return torch.cat([h0.unsqueeze(0), output[:-1]], dim=0)
    following = torch.cat([output[1:], torch.zeros_like(output[:1])], dim=0)
    has_following = torch.cat([valid[1:], torch.zeros_like(valid[:1])], dim=0)
    return torch.where(has_following, following, h0.unsqueeze(0))


def _steps(total: int, reverse: bool, backward: bool):
    forward_order = range(total - 1, -1, -1) if reverse else range(total)
    return reversed(forward_order) if backward else forward_order


def _direction_backward(
    module: nn.RNNBase,
    weights: Dict[str, Optional[torch.Tensor]],
    x: torch.Tensor,
    output: torch.Tensor,
    grad_output: torch.Tensor,
    h0: torch.Tensor,
    c0: Optional[torch.Tensor],
    grad_hn: torch.Tensor,
    grad_cn: Optional[torch.Tensor],
    valid: Optional[torch.Tensor],
    reverse: bool,
) -> DirectionGradients:
    """Gate gradients of every sample and step of one direction: batched recompute, one matmul per step back."""
    total = x.shape[0]
    valid_bool = valid if valid is not None else torch.ones_like(output[..., :1], dtype=torch.bool)
    mask = valid_bool.to(x.dtype)
    h_prev = _previous_hidden(output, h0, reverse, valid_bool)
    w_hh = weights["weight_hh"]
    mode = module.mode
    dh_state = grad_hn
    dgates = torch.empty(x.shape[:2] + (w_hh.shape[0],), dtype=x.dtype, device=x.device)
    passing = None if valid is None else 1.0 - mask  # where a step is padding, the state gradient passes through
    if mode in ("RNN_TANH", "RNN_RELU"):
        slope = (1 - output * output) if mode == "RNN_TANH" else (output > 0).to(x.dtype)
        if valid is not None:
            slope = slope * mask
        grad_steps, slope_steps, dgates_steps = grad_output.unbind(0), slope.unbind(0), dgates.unbind(0)
        for t in _steps(total, reverse, backward=True):
            dh = dh_state + grad_steps[t]
            torch.mul(dh, slope_steps[t], out=dgates_steps[t])
            step = dgates_steps[t]
            dh_state = step @ w_hh if passing is None else torch.addmm(passing[t] * dh, step, w_hh)
        return DirectionGradients(dgates, dgates, h_prev, grad_h0=dh_state)
    if mode == "GRU":
        gx = _projection(x, weights["weight_ih"], weights["bias_ih"])
        gh = _projection(h_prev, w_hh, weights["bias_hh"])
        gx_r, gx_z, gx_n = gx.chunk(3, dim=-1)
        gh_r, gh_z, gh_n = gh.chunk(3, dim=-1)
        r = torch.sigmoid(gx_r + gh_r)
        z = torch.sigmoid(gx_z + gh_z)
        n = torch.tanh(gx_n + r * gh_n)
        da = (1 - z) * (1 - n * n)
        coef_input = torch.cat([da * gh_n * r * (1 - r), (h_prev - n) * z * (1 - z), da], dim=-1)
        if valid is not None:
            coef_input = coef_input * mask
        coef_hidden = torch.cat([coef_input[..., : 2 * n.shape[-1]], coef_input[..., 2 * n.shape[-1] :] * r], dim=-1)
        keep = z if valid is None else torch.where(valid_bool, z, torch.ones_like(z))
        dh_total = torch.empty_like(output)
        by_gate = coef_hidden.shape[:2] + (3, n.shape[-1])  # [T, B, 3, H]: (r, z, n) all take dh
        grad_steps, dh_steps, keep_steps = grad_output.unbind(0), dh_total.unbind(0), keep.unbind(0)
        coef_steps, dgates_by_gate = coef_hidden.view(by_gate).unbind(0), dgates.view(by_gate).unbind(0)
        dgates_steps = dgates.unbind(0)
        for t in _steps(total, reverse, backward=True):
            dh = torch.add(dh_state, grad_steps[t], out=dh_steps[t])
            torch.mul(coef_steps[t], dh.unsqueeze(1), out=dgates_by_gate[t])
            dh_state = torch.addmm(dh * keep_steps[t], dgates_steps[t], w_hh)
        return DirectionGradients(dh_total.repeat(1, 1, 3) * coef_input, dgates, h_prev, grad_h0=dh_state)
    # LSTM: the gate pre-activations in two accumulated matmuls (one bias, no [T, B, 4H] temporaries); c_t is not
    # an output, so recompute it (elementwise, one step at a time)
    bias = None if weights["bias_ih"] is None else weights["bias_ih"] + weights["bias_hh"]
    gates = _projection(x, weights["weight_ih"], bias)
    gates.view(-1, gates.shape[-1]).addmm_(h_prev.reshape(-1, h_prev.shape[-1]), w_hh.T)
    hidden = gates.shape[-1] // 4
    gates[..., : 2 * hidden].sigmoid_()  # in place, gates is ours: i, f, g, o activations
    gates[..., 2 * hidden : 3 * hidden].tanh_()
    gates[..., 3 * hidden :].sigmoid_()
    i, f, g, o = gates.chunk(4, dim=-1)
    # per-step views taken once (unbind): indexing a tensor in the loop costs as much as the step's arithmetic
    cell = torch.empty_like(i)
    cells, fresh, forget_gate = cell.unbind(0), (i * g).unbind(0), f.unbind(0)
    c_state = c0
    for t in _steps(total, reverse, backward=False):
        torch.addcmul(fresh[t], forget_gate[t], c_state, out=cells[t])
        c_state = cells[t] if valid is None else torch.where(valid_bool[t], cells[t], c_state)
    cell_prev = _previous_hidden(cell, c0, reverse, valid_bool)  # c_{t-1} at every valid step, as h_{t-1}
    tanh_c = torch.tanh(cell)
    # d(gates) = [dc, dc, dc, dm] * coef, written per step into dgates as [B, 4, H] views: (i, f, g) take dc, o dm.
    # coef = [g i (1 - i), c_prev f (1 - f), i (1 - g^2), tanh(c) o (1 - o)], each one fused kernel into its slot
    coef = gates.new_empty(gates.shape[:2] + (4, hidden))
    aten = torch.ops.aten
    aten.sigmoid_backward.grad_input(g, i, grad_input=coef[:, :, 0])
    aten.sigmoid_backward.grad_input(cell_prev, f, grad_input=coef[:, :, 1])
    aten.tanh_backward.grad_input(i, g, grad_input=coef[:, :, 2])
    aten.sigmoid_backward.grad_input(tanh_c, o, grad_input=coef[:, :, 3])
    through_cell = aten.tanh_backward(o, tanh_c)  # o (1 - tanh(c)^2)
    if valid is not None:  # padded steps get no gate gradient (all-valid batches skip the multiplications)
        coef.mul_(mask.unsqueeze(2))
        through_cell.mul_(mask)
    dgates_by_gate = dgates.view(coef.shape)
    forget = f if valid is None else torch.where(valid_bool, f, torch.ones_like(f))
    w_hr = weights.get("weight_hr")
    dh_total = torch.empty_like(output) if w_hr is not None else None
    grad_steps, through_steps, forget_steps = grad_output.unbind(0), through_cell.unbind(0), forget.unbind(0)
    coef_cell, coef_out = coef[:, :, :3].unbind(0), coef[:, :, 3].unbind(0)
    dgates_cell, dgates_out = dgates_by_gate[:, :, :3].unbind(0), dgates_by_gate[:, :, 3].unbind(0)
    dgates_steps = dgates.unbind(0)
    order = list(_steps(total, reverse, backward=True))
    dc_state = grad_cn
    dh = dh_state + grad_steps[order[0]]
    for k, t in enumerate(order):
        if w_hr is not None:
            dh_total[t] = dh
            dm = dh @ w_hr
        else:
            dm = dh
        dc = torch.addcmul(dc_state, dm, through_steps[t])
        torch.mul(coef_cell[t], dc.unsqueeze(1), out=dgates_cell[t])
        torch.mul(coef_out[t], dm, out=dgates_out[t])
        dc_state = dc * forget_steps[t]
        following = order[k + 1] if k + 1 < total else None
        if passing is not None:
            dh_state = torch.addmm(passing[t] * dh, dgates_steps[t], w_hh)
            dh = None if following is None else dh_state + grad_steps[following]
        elif following is not None:  # the next step's dh in one call: its output gradient plus this step's share
            dh = torch.addmm(grad_steps[following], dgates_steps[t], w_hh)
        else:
            dh_state = dgates_steps[t] @ w_hh
    projection = None
    if w_hr is not None:
        projection = (dh_total * mask, o * tanh_c)
    return DirectionGradients(dgates, dgates, h_prev, projection, grad_h0=dh_state, grad_c0=dc_state)


def _projection(inputs: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``inputs @ weight.T + bias`` for ``[T, B, d]`` inputs, one matmul (the bias added by it)."""
    flat = inputs.reshape(-1, inputs.shape[-1])
    product = flat @ weight.T if bias is None else torch.addmm(bias, flat, weight.T)
    return product.view(inputs.shape[:2] + (weight.shape[0],))


# -- micro-batch contractions ------------------------------------------------------------------------


def _grouped(tensor: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
    """``[T, B, d]`` -> ``[M, b * T, d]``: every step of every sample of a micro-batch in one matrix."""
    grouped = layout.group(tensor.transpose(0, 1))
    return grouped.reshape(grouped.shape[0], -1, grouped.shape[-1])


def _grouped_once(tensor: torch.Tensor, layout: MicroBatchLayout, done: Dict[int, torch.Tensor]) -> torch.Tensor:
    """:func:`_grouped`, reusing the result for a tensor already grouped (``done`` maps ``id`` to it)."""
    if id(tensor) not in done:
        done[id(tensor)] = _grouped(tensor, layout)
    return done[id(tensor)]


def _outer_sums(left: torch.Tensor, right: torch.Tensor, layout: MicroBatchLayout):
    """Per micro-batch, the sum over its samples and steps of ``left_t right_t^T`` (formed or factored)."""
    return outer_product_sums(_grouped(left, layout), _grouped(right, layout))


def _bias_sums(tensor: torch.Tensor, layout: MicroBatchLayout) -> torch.Tensor:
    return layout.sum_per_microbatch(tensor.sum(dim=0))


def _suffix(layer: int, direction: int) -> str:
    return f"_l{layer}" + ("_reverse" if direction else "")


def _split_grad_outputs(module: nn.RNNBase, grad_outputs: Sequence[Optional[torch.Tensor]]):
    if module.mode == "LSTM":
        return grad_outputs[0], grad_outputs[-2], grad_outputs[-1]
    return grad_outputs[0], grad_outputs[-1], None


@register_microbatch_sampler(nn.LSTM, nn.GRU, nn.RNN, keep_outputs=True, forward=recording_forward)
def recurrent_sampler(
    module: nn.RNNBase, call: LayerCall, grad_outputs: Sequence[Optional[torch.Tensor]]
) -> Dict[nn.Parameter, torch.Tensor]:
    record = getattr(call.outputs[0], RECORD_ATTRIBUTE, None) if call.outputs else None
    if isinstance(record, LoopedRecord):
        return _looped_sums(module, call, record)
    if record is None:
        raise BatchError(
            f"{type(module).__name__} was called on an unbatched input (no batch dimension). Under mbclip give it a "
            "batch: [B, T, features] with batch_first=True, [T, B, features] otherwise, or a PackedSequence."
        )
    batch = record.h0.shape[1]
    if batch != call.layout.batch_size:
        raise BatchError(
            f"{type(module).__name__} saw {batch} sequences but the model's batch has {call.layout.batch_size}: "
            "mbclip needs the recurrent layer to run on the model's batch, one sequence per sample."
        )
    grad_out, grad_hn, grad_cn = _split_grad_outputs(module, grad_outputs)
    if grad_out is not None and module.batch_first and not record.packed:
        grad_out = grad_out.transpose(0, 1)
    sums, input_grads = backward_through_layers(module, record, grad_out, grad_hn, grad_cn, call.layout)
    if record.input_grads_needed is not None and any(record.input_grads_needed):  # for the node's backward, next
        record.input_grads = (torch._C._current_graph_task_id(), input_grads)
    return sums


def backward_through_layers(
    module: nn.RNNBase,
    record: RecurrentRecord,
    grad_out: Optional[torch.Tensor],
    grad_hn: Optional[torch.Tensor],
    grad_cn: Optional[torch.Tensor],
    layout: Optional[MicroBatchLayout],
):
    """Backward through time over every layer, last to first, from the outputs' gradients (``grad_out`` time-major
    or packed data, the final states' in batch order).

    Returns the micro-batch sums of the weights that require grad (none without a ``layout``) and, on the
    sampler-only path, the gradients of the input (time-major or packed data), ``h0`` and ``c0`` that the
    :class:`_SampledRecurrence` node owes (``None`` where not needed)."""
    first_output = record.padded(record.layer_outputs[-1])
    directions = 2 if module.bidirectional else 1
    dtype, device = first_output.dtype, first_output.device
    if dtype in LOW_PRECISION:  # autocast or a half model: through time in float32, as the sums are kept
        dtype = torch.float32
    grad_out = torch.zeros_like(first_output) if grad_out is None else record.padded(grad_out)
    h0 = record.h0.to(dtype)
    c0 = record.c0.to(dtype) if record.c0 is not None else None
    grad_hn = torch.zeros_like(h0) if grad_hn is None else grad_hn.to(dtype)
    if module.mode == "LSTM":
        grad_cn = torch.zeros_like(c0) if grad_cn is None else grad_cn.to(dtype)
    needed = record.input_grads_needed or (False, False, False)
    valid = record.valid_steps(device)
    result: Dict[nn.Parameter, torch.Tensor] = {}
    grad_h0: List[Optional[torch.Tensor]] = [None] * (module.num_layers * directions)
    grad_c0: List[Optional[torch.Tensor]] = list(grad_h0)
    grad_input = None
    grad_layer_output = grad_out.to(dtype)
    for layer in reversed(range(module.num_layers)):
        x = record.padded(record.layer_inputs[layer]).to(dtype)
        output = record.padded(record.layer_outputs[layer]).to(dtype)
        width = output.shape[-1] // directions
        grad_input = None
        for direction in range(directions):
            suffix = _suffix(layer, direction)
            weights = {
                name: getattr(module, name + suffix, None)
                for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
            }
            weights = {name: (w.detach().to(dtype) if w is not None else None) for name, w in weights.items()}
            state = layer * directions + direction
            columns = slice(direction * width, (direction + 1) * width)
            grads = _direction_backward(
                module,
                weights,
                x,
                output[..., columns],
                grad_layer_output[..., columns],
                h0[state],
                c0[state] if c0 is not None else None,
                grad_hn[state],
                grad_cn[state] if grad_cn is not None else None,
                valid,
                reverse=bool(direction),
            )
            grad_h0[state], grad_c0[state] = grads.grad_h0, grads.grad_c0
            if layout is not None:
                _add_layer_sums(module, suffix, grads, x, layout, result)
            if layer > 0 or needed[0]:
                part = grads.gates_input @ weights["weight_ih"]
                grad_input = part if grad_input is None else grad_input + part
        if layer > 0:
            scale = record.dropout_scales[layer - 1]
            grad_layer_output = grad_input if scale is None else grad_input * record.padded(scale).to(dtype)
    input_grads = (
        record.repacked(grad_input) if needed[0] else None,
        torch.stack(grad_h0) if needed[1] else None,
        torch.stack(grad_c0) if needed[2] else None,
    )
    return result, input_grads


def _add_layer_sums(
    module: nn.RNNBase,
    suffix: str,
    grads: DirectionGradients,
    x: torch.Tensor,
    layout: MicroBatchLayout,
    result: Dict[nn.Parameter, torch.Tensor],
) -> None:
    """The micro-batch sums of one direction of one layer's weights that require grad, into ``result``."""
    params = {
        name: getattr(module, name + suffix, None)
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
    }
    # each tensor grouped once: an LSTM's (and RNN's) two weights share their gate gradients, so their
    # factored sums share one tensor (and the step its Gram matrices, see microbatch_sums.GramCache)
    grouped: Dict[int, torch.Tensor] = {}
    if params["weight_ih"].requires_grad:
        rows = [_grouped_once(t, layout, grouped) for t in (grads.gates_input, x)]
        result[params["weight_ih"]] = outer_product_sums(*rows)
    if params["weight_hh"].requires_grad:
        rows = [_grouped_once(t, layout, grouped) for t in (grads.gates_hidden, grads.hidden_prev)]
        result[params["weight_hh"]] = outer_product_sums(*rows)
    input_bias_sums = None
    if params["bias_ih"] is not None and params["bias_ih"].requires_grad:
        result[params["bias_ih"]] = input_bias_sums = _bias_sums(grads.gates_input, layout)
    if params["bias_hh"] is not None and params["bias_hh"].requires_grad:
        same = input_bias_sums is not None and grads.gates_hidden is grads.gates_input  # LSTM and RNN
        result[params["bias_hh"]] = input_bias_sums.clone() if same else _bias_sums(grads.gates_hidden, layout)
    if grads.projection is not None and params["weight_hr"].requires_grad:
        result[params["weight_hr"]] = _outer_sums(*grads.projection, layout)
