"""Where a compiled function's time goes, by kind of work.

XLA runs a compiled function as a sequence of thunks, one per top-level
instruction of its optimised HLO (a fusion, a dot, a copy...), and
`jax.profiler` records each thunk's duration under the instruction's name.
This module reads those durations (`op_seconds`) and sorts the instructions
into kinds of work from the HLO itself (`classify`): int8 dots, the
quantization of their inputs, float matmuls, attention, LayerNorm... A
fusion is one thunk, so the work XLA fused into it is counted with it: a
dequantization fused into the bias add after an int8 dot is reported as
such, apart from the dot. `scripts/benchmark.py --profile` prints the table.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
import re
import tempfile
import time
from typing import Any, Callable, Iterable

import jax

# One instruction: `%name = type opcode(operands), attributes`.
_INSTRUCTION = re.compile(
    r'^\s*(?:ROOT\s+)?%(?P<name>[^\s=]+) = (?P<type>.+?) '
    r'(?P<opcode>[a-z][a-z0-9-]*)\((?P<operands>[^)]*)\)(?P<attrs>.*)$'
)
_CALLS = re.compile(r'calls=%([^\s,}]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_OPERAND = re.compile(r'%([^\s,)}]+)')
_MATMULS = ('dot', 'convolution')
_CONTROL_FLOW = ('while', 'call', 'conditional')
_NO_WORK = ('parameter', 'constant', 'tuple', 'get-tuple-element', 'bitcast')
_IN_A_MODULE = re.compile(r'[/(][A-Z]')  # a flax Module's name: `/ViT/`
# The projections of an attention layer, apart from its einsums and softmax.
_PROJECTIONS = ('/query/', '/key/', '/value/', '/out/')

KINDS = (
    'int8 matmul',
    'quantize activations',
    'dequantize (fused into the next op)',
    'float matmul',
    'attention (scores, softmax, weighted sum)',
    'layer norm',
    'outside the model (loss, optimizer, EMA)',
    'other',
)


@dataclasses.dataclass(frozen=True)
class _Instruction:
  name: str
  type: str  # e.g. 's8[16640,128]{1,0}'
  opcode: str
  operands: tuple[str, ...]
  calls: str | None  # a fusion's body
  # What control flow runs: a while's body and condition, a call's or a
  # conditional's computations.
  runs: tuple[str, ...]
  op_name: str  # the jax operation it came from (its metadata), or ''


@dataclasses.dataclass(frozen=True)
class Op:
  """A thunk of the compiled function: an instruction of a computation
  that is not the body of a fusion."""

  name: str
  kind: str  # one of KINDS
  op_name: str


def _computations(hlo: str) -> tuple[dict[str, list[_Instruction]], str]:
  """({computation name: its instructions}, the entry computation's name)."""
  computations, current, entry = {}, None, ''
  for line in hlo.splitlines():
    header = re.match(r'^(ENTRY\s+)?%(\S+) .*\{\s*$', line)
    if header and not line.startswith(' '):
      current = computations.setdefault(header.group(2), [])
      entry = header.group(2) if header.group(1) else entry
      continue
    m = _INSTRUCTION.match(line)
    if current is None or m is None:
      continue
    op_name = _OP_NAME.search(m['attrs'])
    calls = _CALLS.search(m['attrs'])
    current.append(
        _Instruction(
            name=m['name'],
            type=m['type'],
            opcode=m['opcode'],
            operands=tuple(_OPERAND.findall(m['operands'])),
            calls=calls.group(1) if calls else None,
            # Control flow names the computations it runs in its
            # attributes (body=%b, condition=%c, branch_computations=...).
            runs=tuple(
                _OPERAND.findall(m['attrs'])
                if m['opcode'] in _CONTROL_FLOW
                else ()
            ),
            op_name=op_name.group(1) if op_name else '',
        )
    )
  return computations, entry


def _thunks(
    computations: dict[str, list[_Instruction]], name: str
) -> list[tuple[_Instruction, list[_Instruction]]]:
  """The thunks a computation runs, each with the instructions it computes
  (a fusion: its body). Control flow is replaced by the thunks it runs: its
  own span in a trace covers theirs."""
  thunks = []
  for ins in computations.get(name, []):
    if ins.opcode in _CONTROL_FLOW:
      for called in ins.runs:
        if called in computations:
          thunks += _thunks(computations, called)
    elif ins.opcode not in _NO_WORK:
      inner = computations.get(ins.calls, [ins]) if ins.calls else [ins]
      op_name = ins.op_name or next((i.op_name for i in inner if i.op_name), '')
      thunks.append((dataclasses.replace(ins, op_name=op_name), inner))
  return thunks


def _is_s8_matmul(ins: _Instruction, types: dict[str, str]) -> bool:
  return ins.opcode in _MATMULS and all(
      types.get(o, '').startswith('s8[') for o in ins.operands
  )


def _kind(
    ins: _Instruction, body: list[_Instruction], int8_matmuls: set[str]
) -> str:
  """The kind of work of a thunk, from what it computes (body: the
  instructions it runs, its fused computation for a fusion; int8_matmuls:
  the thunks that run int8 dots, whose int32 results it may read)."""
  if ins.name in int8_matmuls:
    return 'int8 matmul'
  matmul = any(i.opcode in _MATMULS for i in body)
  # What reads an int8 dot's int32 result dequantizes it (and whatever XLA
  # fused with it); what else aqtp's forward pass adds quantizes.
  if not matmul and any(o in int8_matmuls for o in ins.operands):
    return 'dequantize (fused into the next op)'
  if not matmul and (
      any(i.type.startswith('s8[') for i in body) or 'aqt_fwd' in ins.op_name
  ):
    return 'quantize activations'
  in_attention = '/attn/' in ins.op_name and not any(
      p in ins.op_name + '/' for p in _PROJECTIONS
  )
  if in_attention:
    return 'attention (scores, softmax, weighted sum)'
  if matmul:
    return 'float matmul'
  if ins.op_name and not _IN_A_MODULE.search(ins.op_name):
    # The model's work is named after its flax Modules (`ViT/blocks_0/...`,
    # `transpose(jvp(ViT))/...`); the rest of a train step works per
    # parameter or per logit.
    return 'outside the model (loss, optimizer, EMA)'
  if 'norm' in ins.op_name.lower():
    return 'layer norm'
  return 'other'


def _parse(
    hlo: str,
) -> tuple[list[tuple[_Instruction, list[_Instruction]]], dict[str, str]]:
  """(the thunks of the entry computation with what each computes, the
  type of every instruction by name)."""
  computations, entry = _computations(hlo)
  types = {i.name: i.type for body in computations.values() for i in body}
  return _thunks(computations, entry), types


def classify(hlo: str) -> dict[str, Op]:
  """{thunk name: Op} for the optimised HLO text of a compiled function
  (`jitted.lower(...).compile().as_text()`)."""
  thunks, types = _parse(hlo)
  int8_matmuls = {
      ins.name
      for ins, inner in thunks
      if any(_is_s8_matmul(i, types) for i in inner)
  }
  return {
      ins.name: Op(ins.name, _kind(ins, inner, int8_matmuls), ins.op_name)
      for ins, inner in thunks
  }


def s8_dots(hlo: str) -> int:
  """Matmuls with both operands int8 that the compiled function runs."""
  thunks, types = _parse(hlo)
  return sum(_is_s8_matmul(i, types) for _, inner in thunks for i in inner)


def module_name(hlo: str) -> str:
  """The HLO module's name (`HloModule jit_step_fn, ...`), which the
  profiler records with every thunk it runs."""
  m = re.match(r'HloModule (\S+?),?\s', hlo)
  if not m:
    raise ValueError('not the text of an HLO module')
  return m.group(1)


@dataclasses.dataclass(frozen=True)
class Traced:
  """Per call of the traced function: seconds in each of its program's
  thunks (summed over the threads and devices that ran them) and wall-clock
  seconds."""

  seconds: dict[str, float]
  wall_seconds: float


def op_seconds(
    call: Callable[[], Any], hlo_module: str, calls: int = 10
) -> Traced:
  """Traces `calls` calls of `call` with `jax.profiler` and returns the time
  of the thunks of the program named `hlo_module` (module_name of its HLO),
  by instruction name; the thunks of other programs the call runs (an input
  pipeline's, say) are left out. `call` runs twice first, so that
  compilation is not traced."""
  for _ in range(2):
    jax.block_until_ready(call())
  with tempfile.TemporaryDirectory() as trace_dir:
    with jax.profiler.trace(trace_dir):
      start = time.perf_counter()
      for _ in range(calls):
        jax.block_until_ready(call())
      wall = (time.perf_counter() - start) / calls
    (trace,) = Path(trace_dir).rglob('*.xplane.pb')
    profile = jax.profiler.ProfileData.from_file(str(trace))
  seconds = collections.Counter()
  for plane in profile.planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get('hlo_module') == hlo_module and 'hlo_op' in stats:
          seconds[stats['hlo_op']] += event.duration_ns * 1e-9 / calls
  return Traced(dict(seconds), wall)


@dataclasses.dataclass(frozen=True)
class Share:
  kind: str
  seconds: float  # per call, summed over threads
  fraction: float  # of the thunks' total
  thunks: int  # how many thunks of this kind ran


def shares(ops: dict[str, Op], seconds: dict[str, float]) -> list[Share]:
  """Time per kind of work, largest first. Events that are not thunks of
  `ops` (the executor's own spans, other programs) are left out; none
  matching at all is an error, not an empty table."""
  by_kind = collections.defaultdict(float)
  count = collections.Counter()
  for name, op in ops.items():
    if name in seconds:
      by_kind[op.kind] += seconds[name]
      count[op.kind] += 1
  if not by_kind:
    raise ValueError(
        f'None of the {len(seconds)} traced events is one of the compiled '
        f"function's {len(ops)} thunks (e.g. {sorted(ops)[:3]}): the trace "
        'is of another program, or the profiler names its events otherwise '
        'than this module reads them.'
    )
  total = sum(by_kind.values())
  return sorted(
      (Share(k, s, s / total, count[k]) for k, s in by_kind.items()),
      key=lambda s: -s.seconds,
  )


def format_shares(rows: Iterable[Share]) -> str:
  lines = [f'  {"kind of work":44} {"ms/call":>8} {"share":>6} {"thunks":>6}']
  for r in rows:
    lines.append(
        f'  {r.kind:44} {1e3 * r.seconds:8.3f} {100 * r.fraction:5.1f}% '
        f'{r.thunks:6d}'
    )
  return '\n'.join(lines)
