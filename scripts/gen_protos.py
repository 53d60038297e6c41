#!/usr/bin/env python3
"""Generate the protobuf and gRPC Python code in proxy/gen/ from protos/.

The generated files are committed so that installing the project needs no code
generator; tests/test_generated_code.py regenerates into a temporary folder and fails
when the committed files are stale. Run this after editing anything under protos/:

    .venv/bin/python scripts/gen_protos.py
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
# The protos are compiled as if they lived in proxy/gen/ so that the generated modules
# import each other as `proxy.gen.x_pb2` (protoc derives Python imports from proto paths).
VIRTUAL_DIR = "proxy/gen"


def generate(out_root: Path) -> list[Path]:
    """Compile every .proto under protos/ into out_root/proxy/gen/; return the files made."""
    from grpc_tools import protoc

    target = out_root / VIRTUAL_DIR
    target.mkdir(parents=True, exist_ok=True)
    protos = sorted(p.name for p in PROTOS.glob("*.proto"))
    args = [
        "grpc_tools.protoc",
        f"--proto_path={VIRTUAL_DIR}={PROTOS}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[f"{VIRTUAL_DIR}/{name}" for name in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed; see the messages above")
    init = target / "__init__.py"
    init.write_text(
        '"""Generated protobuf and gRPC code; do not edit (scripts/gen_protos.py)."""\n'
    )
    return sorted(p for p in target.iterdir() if p.suffix in {".py", ".pyi"})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT,
        help="root to write proxy/gen/ under (default: the repository itself)",
    )
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path.relative_to(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
