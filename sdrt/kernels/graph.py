"""A small editable view of an ONNX graph for the rewrite passes: who produces and who consumes
each value, constant lookup, node replacement, dead-node removal.

Passes edit the GraphProto in place and never touch weights, so a rewritten graph can be saved next
to the original and point at the same external data file (no second copy of a 3.4 GB UNet).
"""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"


class Graph:
    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.g = model.graph
        # protobuf hands out a new wrapper per index access; passes work on this list and
        # commit() writes it back
        self.nodes = list(self.g.node)
        self._counter = 0
        self._taken: set[str] | None = None  # names in use, gathered on the first fresh()
        self.refresh()

    def commit(self) -> None:
        nodes = list(self.nodes)
        del self.g.node[:]
        self.g.node.extend(nodes)
        self.nodes = list(self.g.node)
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers = defaultdict(list)
        for n in self.nodes:
            for i in node_inputs(n):
                self.consumers[i].append(n)
        self.initializers = {t.name: t for t in self.g.initializer}
        self.shapes, self.types = {}, {}
        for v in list(self.g.value_info) + list(self.g.input) + list(self.g.output):
            self.types[v.name] = v.type.tensor_type.elem_type
            dims = v.type.tensor_type.shape.dim
            self.shapes[v.name] = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in dims]

    def only_consumer(self, value: str, op_type: str):
        """The single node reading `value` if it is an `op_type` (and `value` is not a graph output)."""
        users = self.consumers.get(value, [])
        if len(users) == 1 and users[0].op_type == op_type and value not in self.graph_outputs:
            return users[0]
        return None

    @property
    def graph_outputs(self) -> set[str]:
        return {o.name for o in self.g.output}

    def parent(self, node, index: int, op_type: str):
        """The producer of node.input[index] if it is an `op_type`."""
        return self.parent_of(node.input[index], op_type) if index < len(node.input) else None

    def parent_of(self, value: str, op_type: str):
        """The producer of VALUE if it is an `op_type`."""
        p = self.producer.get(value)
        return p if p is not None and p.op_type == op_type else None

    def add_initializer(self, stem: str, array: np.ndarray) -> str:
        name = self.fresh(stem)
        self.g.initializer.append(numpy_helper.from_array(np.asarray(array), name))
        self.initializers[name] = self.g.initializer[-1]
        return name

    def fresh(self, stem: str) -> str:
        """A value name no node, initializer or graph input uses yet (an earlier pass's Graph on the same
        model numbered its names from 1 too)."""
        if self._taken is None:
            self._taken = ({o for n in self.g.node for o in n.output} | {t.name for t in self.g.initializer}
                           | {v.name for v in self.g.input})
        while True:
            self._counter += 1
            name = f"sdrt_{stem}_{self._counter}"
            if name not in self._taken:
                self._taken.add(name)
                return name

    def replace(self, old: list, new: list) -> None:
        """Put `new` where the first of `old` was; drop the rest of `old`. Call refresh() after a batch."""
        drop = {id(n) for n in old}
        first = min(i for i, n in enumerate(self.nodes) if id(n) in drop)
        self.nodes = ([n for n in self.nodes[:first] if id(n) not in drop] + list(new)
                      + [n for n in self.nodes[first:] if id(n) not in drop])

    def remove_dead(self) -> int:
        """Drop the nodes no graph output depends on, and the initializers no node reads; return how
        many nodes went. One walk back from the outputs (a fixed point of "drop the nodes whose
        outputs nobody reads" took a refresh per layer of a long dead chain: 17 s for tiny's shallow
        UNet)."""
        self.refresh()
        live, stack = set(), list(self.graph_outputs)
        while stack:
            node = self.producer.get(stack.pop())
            if node is not None and id(node) not in live:
                live.add(id(node))
                stack.extend(i for i in node_inputs(node) if i)
        removed = len(self.nodes) - len(live)
        self.nodes = [n for n in self.nodes if id(n) in live]
        used = {i for n in self.nodes for i in node_inputs(n)} | self.graph_outputs
        for t in [t for t in self.g.initializer if t.name not in used]:
            self.g.initializer.remove(t)
        self.refresh()
        return removed

    def use_opset(self, domain: str, version: int = 1) -> None:
        if not any(o.domain == domain for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(domain, version))


class Constants:
    """The constants a pass's rewritten layers share, one initializer per stem, made on first use."""

    def __init__(self, graph: Graph, prefix: str):
        self.graph, self.prefix = graph, prefix
        self._made: dict[str, str] = {}

    def get(self, stem: str, array) -> str:
        if stem not in self._made:
            self._made[stem] = self.graph.add_initializer(f"{self.prefix}_{stem}", np.asarray(array))
        return self._made[stem]

    def ints(self, *values: int) -> str:
        """A 1-D int64 constant (Slice's starts, ends and axes; shapes)."""
        return self.get("ints_" + "_".join(map(str, values)), np.array(values, np.int64))

    def overridable(self, stem: str, array) -> str:
        """An initializer that is also a graph input: ONNX Runtime does not constant-fold through it."""
        if stem not in self._made:
            name = self.get(stem, array)
            t = self.graph.initializers[name]
            self.graph.g.input.append(helper.make_tensor_value_info(name, t.data_type, list(t.dims)))
            self._made[stem] = name
        return self._made[stem]


class Builder:
    """Appends nodes to a list for a pass; each call returns the new node's output name (a fresh one,
    or OUTPUT where given)."""

    def __init__(self, graph: Graph, k: Constants):
        self.graph, self.ints, self.nodes = graph, k.ints, []

    def __call__(self, op: str, *inputs: str, output: str | None = None, **attributes) -> str:
        out = output or self.graph.fresh(op.lower())
        self.nodes.append(helper.make_node(op, list(inputs), [out], **attributes))
        return out


def module_scopes(node) -> list[str]:
    """The module paths torch's exporter recorded for NODE, outermost first (`unet.up_blocks.3.resnets.2`;
    it writes some as `unet.__dict__['_modules']['up_blocks'].3...`, read as the dotted path); [] if none."""
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            try:
                scopes = [str(s) for s in ast.literal_eval(p.value)]
            except (ValueError, SyntaxError):
                return []
            return [re.sub(r"\.?__dict__\['_modules'\]\['(\w+)'\]", r".\1", s) for s in scopes]
    return []


def node_inputs(node) -> list[str]:
    """NODE's inputs, and the outer values its subgraphs (an If's branches) read: inputs in all but
    name, which dead-node removal, consumers and ordering must count."""
    return [*node.input, *subgraph_reads(node)] if node.attribute else list(node.input)


def subgraph_reads(node) -> list[str]:
    """The values from outside that NODE's subgraph attributes read (nested subgraphs included)."""
    reads: list[str] = []
    for a in node.attribute:
        for g in [a.g] if a.type == AttributeProto.GRAPH else a.graphs:
            local = {v.name for v in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
            for n in g.node:
                reads += [i for i in node_inputs(n) if i and i not in local and i not in reads]
    return reads


def attrs(node) -> dict:
    """A node's attributes as Python values (the one attribute helper of the passes)."""
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def run_pass(graph: Graph, candidates, rewrite, *, domain: str | None = None, prune: bool = False) -> int:
    """The pass driver (ONNX Runtime's Fusion: search, replace, prune, count). REWRITE(candidate)
    returns (nodes to remove, nodes to put in their place), or None where the pattern does not match.
    Replacements are applied as a batch; DOMAIN is added to the opset imports if anything matched;
    PRUNE then drops nodes whose outputs nobody reads any more. Returns how many matched."""
    count = 0
    for candidate in list(candidates):
        match = rewrite(candidate)
        if match is not None:
            old, new = match
            graph.replace(old, new)
            count += 1
    if count and domain:
        graph.use_opset(domain)
    if count and prune:
        graph.remove_dead()
    graph.commit()
    return count


def toposort(graph: onnx.GraphProto) -> None:
    """Order nodes so each comes after its inputs' producers (ONNX requires it; some tools append)."""
    nodes = list(graph.node)
    produced_by = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    order, state = [], [0] * len(nodes)  # 0 new, 1 in progress, 2 placed
    for start in range(len(nodes)):
        stack = [(start, False)]
        while stack:
            i, expanded = stack.pop()
            if state[i] == 2:
                continue
            if expanded:
                state[i] = 2
                order.append(nodes[i])
                continue
            state[i] = 1
            stack.append((i, True))
            for x in node_inputs(nodes[i]):
                j = produced_by.get(x)
                if j is not None and state[j] == 0:
                    stack.append((j, False))
    del graph.node[:]
    graph.node.extend(order)


def externalize(path: Path) -> bool:
    """Move inline weights of the model at PATH to PATH.data (so rewritten graphs can share them);
    False if it already keeps them outside."""
    model = onnx.load(str(path), load_external_data=False)
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        return False
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
              location=path.name + ".data", size_threshold=1024)
    return True


def load_graph_only(path: Path) -> onnx.ModelProto:
    """The graph without its external weights (they stay where they are)."""
    return onnx.load(str(path), load_external_data=False)


def save_graph_only(model: onnx.ModelProto, path: Path) -> None:
    """Save a rewritten graph beside the original: external tensors keep pointing at the original's
    data file (same directory), new small initializers are stored inline."""
    onnx.save(model, str(path))
