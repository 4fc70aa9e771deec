"""Compiles protos/ into the importable `latentmoe.v1` package whenever the project is built or installed."""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "protos"
GEN_ROOT = ROOT / "gen"


def compile_protos() -> None:
    from grpc_tools import protoc

    protos = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"--python_out={GEN_ROOT}",
        f"--pyi_out={GEN_ROOT}",
        f"--grpc_python_out={GEN_ROOT}",
        *protos,
    ]
    (GEN_ROOT / "latentmoe" / "v1").mkdir(parents=True, exist_ok=True)
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {protos}")
    for init in (GEN_ROOT / "latentmoe" / "__init__.py", GEN_ROOT / "latentmoe" / "v1" / "__init__.py"):
        init.touch()


compile_protos()
setup(
    packages=[*find_packages(include=["common*", "services*"]), "latentmoe", "latentmoe.v1"],
    package_dir={"latentmoe": "gen/latentmoe"},
    package_data={"common.kernels": ["csrc/*.cpp", "csrc/*.h"]},  # built at first use (cpu_extension.py)
)
