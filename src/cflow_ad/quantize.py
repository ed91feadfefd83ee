"""Static int8 quantisation of an exported model's decoder matrix products (QDQ form).

Each decoder product `activation @ weight` (`FoldedFlow`: the weight is a constant second input)
becomes QuantizeLinear -> DequantizeLinear on the activation, a per-tensor uint8 with the range
that training recorded (`CFlowModel.activation_ranges`), and DequantizeLinear of an int8 weight
with one scale per output column. onnxruntime fuses each such group into one integer product
(u8 x s8; on an AVX2-only CPU it measured barely faster than fp32, benchmarks/RESULTS.md), and
other runtimes read the standard QDQ operators. The ranges come from the training images' own decoder passes, so an
export needs no images; the encoder, whitening and scoring stay fp32.
"""

from __future__ import annotations

import numpy as np

from .errors import CflowInputError

WEIGHT_MAX = 127  # symmetric int8 weights, zero point 0
# The uint8 grid spans HEADROOM times the training range. A defect's fibers lie far outside the
# training range, and a grid that clips them there lifts their likelihood back towards normal: with
# the bare range the synthetic test set's image AUROC fell from 1.0 to 0.83, from 2x on it stayed 1.0.
# Beyond HEADROOM x the range, int8 scores stop growing (fp32 log scores never do).
HEADROOM = 4.0


def activation_qparams(low: float, high: float) -> tuple[np.float32, np.uint8]:
    """(scale, zero point) of the uint8 grid over [low, high], widened to hold 0 exactly."""
    low, high = min(float(low), 0.0), max(float(high), 0.0)
    scale = max((high - low) / 255.0, 1e-12)
    return np.float32(scale), np.uint8(np.clip(round(-low / scale), 0, 255))


def weight_qparams(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An [in, out] weight as (int8 values, float32 scale per output column)."""
    scale = np.abs(weight).max(0) / WEIGHT_MAX
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.round(weight / scale), -WEIGHT_MAX, WEIGHT_MAX).astype(np.int8), scale


def quantize_products(proto, products: list[tuple[np.ndarray, float, float]]):
    """Rewrite, in place, the MatMuls of `proto` whose constant second input (initializer or Constant) equals the next of
    `products` (weight [in, out], input low, input high), in graph order, into the QDQ form. Every
    product must be found, else the export's layout changed and an error says so. Returns `proto`."""
    from onnx import helper, numpy_helper

    graph = proto.graph
    constants = {t.name: t for t in graph.initializer}  # the tracer writes weights as both kinds
    constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                      if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
    queue = list(products)
    nodes = []
    for node in graph.node:
        if queue and node.op_type == "MatMul" and node.input[1] in constants:
            weight, low, high = queue[0]
            constant = numpy_helper.to_array(constants[node.input[1]])
            if constant.shape == weight.shape and np.array_equal(constant, weight):
                queue.pop(0)
                i = len(products) - len(queue)
                x_scale, x_zero = activation_qparams(HEADROOM * low, HEADROOM * high)
                w_int, w_scale = weight_qparams(weight)
                names = {part: f"int8/{i}/{part}" for part in ("xs", "xz", "xq", "x", "w", "ws", "wz", "wf")}
                graph.initializer.extend([
                    numpy_helper.from_array(np.array(x_scale), names["xs"]),
                    numpy_helper.from_array(np.array(x_zero), names["xz"]),
                    numpy_helper.from_array(w_int, names["w"]),
                    numpy_helper.from_array(w_scale, names["ws"]),
                    numpy_helper.from_array(np.zeros(len(w_scale), np.int8), names["wz"]),
                ])
                nodes += [
                    helper.make_node("QuantizeLinear", [node.input[0], names["xs"], names["xz"]], [names["xq"]]),
                    helper.make_node("DequantizeLinear", [names["xq"], names["xs"], names["xz"]], [names["x"]]),
                    helper.make_node("DequantizeLinear", [names["w"], names["ws"], names["wz"]], [names["wf"]], axis=1),
                ]
                node.input[0], node.input[1] = names["x"], names["wf"]
        nodes.append(node)
    if queue:
        raise CflowInputError(f"int8 export: {len(queue)} of {len(products)} decoder products were not found in the"
                              " traced graph (its layout changed): export without --quantize")
    used = {name for node in nodes for name in node.input} | {o.name for o in graph.output}
    del graph.node[:]
    graph.node.extend(n for n in nodes if n.op_type != "Constant" or n.output[0] in used)  # the replaced weights go
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return proto
