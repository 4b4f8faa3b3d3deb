"""Which replicate group plays which part in a seed study's comparison.

Explicit names win; then the seeds' experiment names (e5/e6, e7a/e7b/e7c) found as a token
in a group's name or directory names; then, for E6 only, the configs (constant vs Min-SNR
weighting with everything else that shapes training equal).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from diffdyn import errors
from diffdyn.analysis import runs as runs_lib

# Config sections that shape training; E5 and E6 must agree on them to be paired.
_TRAINING_SECTIONS = ("data.", "diffusion.", "model.", "train.")


def find_group(groups: Sequence[runs_lib.Group], name: str, flag: str) -> runs_lib.Group:
  """The one group answering to `name` (case-insensitive), or a UserError naming the flag."""
  wanted = name.lower()
  found = [g for g in groups if wanted in {n.lower() for n in g.names()}]
  if not found:
    known = ", ".join(g.name for g in groups)
    raise errors.UserError(f"{flag} {name!r}: no run or group by that name (have: {known})")
  if len(found) > 1:
    raise errors.UserError(f"{flag} {name!r}: matches several groups "
                           f"({', '.join(g.name for g in found)})")
  return found[0]


def _named(groups: Sequence[runs_lib.Group], token: str) -> list[runs_lib.Group]:
  pattern = re.compile(rf"(?<![a-z0-9]){re.escape(token)}(?![a-z0-9])")
  return [g for g in groups if any(pattern.search(n.lower()) for n in g.names())]


def _training_config(group: runs_lib.Group) -> dict:
  flat = runs_lib.flatten_config(group.config)
  return {k: v for k, v in flat.items() if k.startswith(_TRAINING_SECTIONS)}


def _weighting(group: runs_lib.Group):
  return runs_lib.config_get(group.config, "loss.weighting")


def e6_roles(groups: Sequence[runs_lib.Group], baseline: str | None = None,
             treatment: str | None = None):
  """(baseline, treatment, how) for the E6-vs-E5 comparison, or (None, None, why not)."""
  if baseline or treatment:
    base = find_group(groups, baseline, "--baseline") if baseline else None
    treat = find_group(groups, treatment, "--treatment") if treatment else None
    if base is None:
      base = _only([g for g in groups if g is not treat and _weighting(g) == "constant"])
    if treat is None:
      others = [g for g in groups if g is not base]
      treat = _only([g for g in others if _weighting(g) == "minsnr"]) or _only(others)
    if base is None or treat is None:
      return None, None, "give both --baseline and --treatment: the other role is ambiguous"
    return base, treat, "given on the command line"
  e5, e6 = _named(groups, "e5"), _named(groups, "e6")
  if len(e5) == 1 and len(e6) == 1:
    return e5[0], e6[0], "by name (e5, e6)"
  treats = [g for g in groups if _weighting(g) == "minsnr"]
  if len(treats) != 1:
    return None, None, (f"{len(treats)} Min-SNR groups and no e5/e6 pair by name; use "
                        "--baseline and --treatment")
  matching = [g for g in groups if _weighting(g) == "constant"
              and _training_config(g) == _training_config(treats[0])]
  if len(matching) != 1:
    return None, None, (f"{len(matching)} constant-weighting groups match the Min-SNR group's "
                        "data/diffusion/model/train config; use --baseline")
  return matching[0], treats[0], "by config (loss.weighting constant vs minsnr)"


def _only(groups: list[runs_lib.Group]) -> runs_lib.Group | None:
  return groups[0] if len(groups) == 1 else None


E7_ROLES = ("e7a", "e7b", "e7c")


def e7_roles(groups: Sequence[runs_lib.Group], names: Sequence[str] | None = None):
  """({role: group or None}, how, {role: why it is None}) for E7a/E7b/E7c."""
  if names:
    return ({role: find_group(groups, name, "--e7") for role, name in zip(E7_ROLES, names)},
            "given on the command line", {})
  found, missing = {}, {}
  for role in E7_ROLES:
    named = _named(groups, role)
    found[role] = named[0] if len(named) == 1 else None
    if len(named) > 1:
      missing[role] = (f"several groups are named {role} ({', '.join(g.name for g in named)}); "
                       "use --e7")
    elif not named:
      missing[role] = f"no run named {role} (or use --e7)"
  return found, "by name (e7a, e7b, e7c)", missing


@dataclasses.dataclass(frozen=True)
class Comparison:
  """Groups the curvature figures overlay: `tag` names their files, `title` their headings."""
  tag: str
  title: str
  groups: tuple[runs_lib.Group, ...]


def curvature_comparisons(groups: Sequence[runs_lib.Group], baseline: str | None = None,
                          treatment: str | None = None,
                          e7_names: Sequence[str] | None = None) -> list[Comparison]:
  """E6 vs E5 and E7c vs E7a, in the roles the criteria use; all groups when neither is found.

  E7b (E7a trained longer) is left out: the curvature question of E7 is the width's, which
  E7c vs E7a asks (its tr/P compares widths).
  """
  found = []
  base, treat, _ = e6_roles(groups, baseline, treatment)
  if base is not None:
    found.append(Comparison("e6_vs_e5", f"E6 vs E5 ({treat.name} vs {base.name})",
                            (base, treat)))
  e7, _, _ = e7_roles(groups, e7_names)
  if e7["e7a"] is not None and e7["e7c"] is not None:
    found.append(Comparison("e7c_vs_e7a", f"E7c vs E7a ({e7['e7c'].name} vs {e7['e7a'].name})",
                            (e7["e7a"], e7["e7c"])))
  if not found:
    found.append(Comparison("runs", "all runs", tuple(groups)))
  return found
