"""The built wheel carries the Metal kernel sources and they load from the installed package."""

import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_wheel_ships_kernel_sources(tmp_path):
    sources = sorted(p.name for p in (REPO / "metal").glob("*.metal"))
    assert sources, "metal/ has no kernel sources"

    wheel_dir = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(wheel_dir), str(REPO)],
        check=True, cwd=tmp_path,
    )
    (wheel,) = wheel_dir.glob("mlxq-*.whl")

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", str(wheel)], check=True)

    # Run from an empty folder so nothing can come from the checkout.
    script = (
        "import sys, mlxq.kernel_source as ks\n"
        "assert 'site-packages' in ks.__file__, ks.__file__\n"
        "for name in sys.argv[1:]:\n"
        "    sys.stdout.write(ks.read_kernel_source(name))\n"
    )
    out = subprocess.run(
        [python, "-c", script, *sources], check=True, capture_output=True, text=True,
        cwd=tmp_path,
    ).stdout
    assert out == "".join((REPO / "metal" / name).read_text() for name in sources)
