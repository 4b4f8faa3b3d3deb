"""What a compiled program costs before it runs: FLOPs, bytes, memory, and a launch count.

The FLOP and byte counts come from XLA's cost analysis of the optimized program. The launch
count is read off the optimized HLO text: every instruction of a computation that runs at the
top level (the entry computation and the bodies of its loops and conditionals) that is not
pure bookkeeping. On a GPU each such instruction is one kernel (a fusion, a cuDNN/cuBLAS
call, a copy); on the CPU the backend fuses less, so its count is an upper bound.
"""
from __future__ import annotations

import dataclasses
import re

# Instructions that launch nothing: they rename, group or route buffers, or hold a loop.
BOOKKEEPING = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "opt-barrier", "partition-id", "replica-id", "add-dependency",
    "domain", "async-done", "copy-done", "send-done", "recv-done",
})
# Attributes naming computations that run at the caller's level, not inside one kernel.
_TOP_LEVEL_CALLEES = re.compile(
    r"\b(?:body|condition|true_computation|false_computation|to_apply)=%?([\w.\-]+)|"
    r"\bbranch_computations=\{([^}]*)\}")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")


@dataclasses.dataclass(frozen=True)
class LaunchCount:
  entry: int         # launches of one call of the program outside its loops
  loop_bodies: int   # launches of one iteration of every while loop together (a scan's step)


def _opcode(instruction: str) -> str | None:
  """The opcode of `%name = TYPE opcode(...)`; TYPE may be a parenthesised tuple."""
  _, sep, rest = instruction.partition(" = ")
  if not sep:
    return None
  rest = rest.lstrip()
  if rest.startswith("("):
    depth = 0
    for i, ch in enumerate(rest):
      depth += ch == "("
      depth -= ch == ")"
      if depth == 0:
        rest = rest[i + 1:]
        break
  else:
    rest = rest.split(None, 1)[1] if " " in rest else ""
  match = re.match(r"\s*([a-z][a-z0-9\-]*)\(", rest)
  return match.group(1) if match else None


def _computations(hlo_text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the entry computation's name."""
  computations, entry, current = {}, None, None
  for line in hlo_text.splitlines():
    header = _HEADER.match(line)
    if header and not line.startswith(" "):
      current = header.group(2)
      computations[current] = []
      if header.group(1):
        entry = current
    elif line.startswith("}"):
      current = None
    elif current is not None and " = " in line:
      computations[current].append(line.strip().removeprefix("ROOT "))
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return computations, entry


def count_launches(hlo_text: str) -> LaunchCount:
  """Kernel launches of an optimized HLO module (see the module docstring)."""
  computations, entry = _computations(hlo_text)

  def launches(name: str) -> int:
    return sum(_opcode(i) not in BOOKKEEPING and _opcode(i) is not None
               for i in computations.get(name, []))

  def callees(name: str, opcodes: tuple[str, ...]) -> list[str]:
    found = []
    for instruction in computations.get(name, []):
      if _opcode(instruction) in opcodes:
        for match in _TOP_LEVEL_CALLEES.finditer(instruction):
          if match.group(1):
            found.append(match.group(1))
          else:
            found += [c.strip().lstrip("%") for c in match.group(2).split(",")]
    return found

  def with_calls(name: str) -> int:
    """Launches of `name`, counting the bodies of its `call`s and branches in line."""
    return launches(name) + sum(with_calls(c)
                                for c in callees(name, ("call", "conditional")))

  def loop_bodies(name: str) -> int:
    total = 0
    for loop in callees(name, ("while",)):
      total += with_calls(loop) + loop_bodies(loop)
    for inner in callees(name, ("call", "conditional")):
      total += loop_bodies(inner)
    return total

  return LaunchCount(entry=with_calls(entry), loop_bodies=loop_bodies(entry))


def cost(compiled) -> dict[str, float]:
  """XLA's FLOPs and bytes accessed for one call of a compiled program (0 if unavailable)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  analysis = analysis or {}
  return {"flops": float(analysis.get("flops", 0.0)),
          "bytes": float(analysis.get("bytes accessed", 0.0))}


def program_memory_bytes(compiled) -> int | None:
  """Device memory XLA plans for one call: arguments, outputs and temporaries, less aliasing."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
             + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


@dataclasses.dataclass(frozen=True)
class Machine:
  """The peak rates a time floor divides by; stated, not measured."""
  name: str
  flops_per_s: float
  bytes_per_s: float
  seconds_per_launch: float


# H100 SXM datasheet peaks: 989 TFLOP/s dense bf16 and 495 dense TF32 on tensor cores,
# 67 TFLOP/s float32 without them; 3.35 TB/s HBM3. The H200 is the same chip with 4.8 TB/s
# HBM3e. About 2 us per small kernel back to back (launch plus ramp-up and drain) is an
# assumption, not a datasheet figure.
H100_BF16 = Machine("H100 bf16", 989e12, 3.35e12, 2e-6)
H100_TF32 = Machine("H100 tf32", 495e12, 3.35e12, 2e-6)
H100_FP32 = Machine("H100 fp32 (no TF32)", 67e12, 3.35e12, 2e-6)
H200_BF16 = Machine("H200 bf16", 989e12, 4.8e12, 2e-6)
H200_TF32 = Machine("H200 tf32", 495e12, 4.8e12, 2e-6)
H200_FP32 = Machine("H200 fp32 (no TF32)", 67e12, 4.8e12, 2e-6)


def machines(device_kind: str) -> dict[str, Machine]:
  """{"fp32", "tf32", "bf16": Machine} of a device kind as JAX or torch names it; {} if unknown."""
  for model, table in (("H200", (H200_FP32, H200_TF32, H200_BF16)),
                       ("H100", (H100_FP32, H100_TF32, H100_BF16))):
    if model in device_kind.upper():
      return dict(zip(("fp32", "tf32", "bf16"), table))
  return {}


def floors_ms(flops: float, bytes_accessed: float, launches: int,
              machine: Machine) -> dict[str, float]:
  """Lower bounds on one call's time from each resource alone, in milliseconds."""
  return {"flops_ms": 1e3 * flops / machine.flops_per_s,
          "bytes_ms": 1e3 * bytes_accessed / machine.bytes_per_s,
          "launch_ms": 1e3 * launches * machine.seconds_per_launch}
