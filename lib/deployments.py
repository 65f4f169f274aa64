"""prefect.yaml's `config` parameters, generated from the profiles in configs/: one source of truth.

A deployment's `config` parameter is the whole typed PipelineConfig, so that the Prefect UI shows it
as a form; YAML cannot include another file, so the profile's values are written into prefect.yaml.
Each generated block sits between two marker comments naming its profile:

    parameters:
      # generated from configs/demo.yaml (make deployments): edit the profile, not this block
      config:
        ...
      # end of generated block

    python -m lib.deployments          # rewrite prefect.yaml from configs/
    python -m lib.deployments --check  # exit 1 if prefect.yaml is not what configs/ generate

Everything outside the markers (schedules, work pools, comments) is left as written.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^(?P<indent> *)# generated from (?P<profile>configs/\S+\.yaml) .*$")
END = "# end of generated block"


def config_block(profile: Path, indent: str) -> list[str]:
    """`config:` and the profile's values, indented to sit at `indent` (comments are not carried)."""
    values = yaml.safe_load(profile.read_text(encoding="utf-8"))
    body = yaml.safe_dump({"config": values}, allow_unicode=True, sort_keys=False, default_flow_style=False, width=100)
    return [indent + line if line else line for line in body.splitlines()]


def generate(text: str, root: Path = ROOT) -> str:
    """`text` (prefect.yaml) with every generated block rewritten from its profile."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        out.append(lines[i])
        begin = BEGIN.match(lines[i])
        i += 1
        if not begin:
            continue
        end = next((j for j in range(i, len(lines)) if lines[j].strip() == END), None)
        if end is None:
            raise ValueError(f"prefect.yaml: the block generated from {begin['profile']} has no '{END}' line")
        out += config_block(root / begin["profile"], begin["indent"]) + [lines[end]]
        i = end + 1
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write prefect.yaml's config parameters from configs/.")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 if prefect.yaml is out of date")
    parser.add_argument("--file", default=str(ROOT / "prefect.yaml"))
    args = parser.parse_args(argv)
    path = Path(args.file)
    current = path.read_text(encoding="utf-8")
    wanted = generate(current, path.parent)
    if args.check:
        if wanted != current:
            print(f"{path} is out of date with configs/: run `make deployments`", file=sys.stderr)
            return 1
        return 0
    if wanted != current:
        path.write_text(wanted, encoding="utf-8")
        print(f"rewrote {path} from configs/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
