"""Build the FUSE request hook (scratchfs/_fusehook.c) and the block loader
(scratchfs/squashfs/_blockload.c); everything else is in pyproject.toml."""

import subprocess

from setuptools import Extension, setup


def fuse3_includes() -> list[str]:
    try:
        out = subprocess.run(
            ["pkg-config", "--cflags-only-I", "fuse3"], check=True, capture_output=True, text=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return ["/usr/include/fuse3"]
    return [flag[2:] for flag in out.split() if flag.startswith("-I")]


setup(
    ext_modules=[
        # A plain shared library loaded with ctypes (scratchfs/fusehook.py), not a Python module.
        Extension(
            "scratchfs._fusehook",
            sources=["scratchfs/_fusehook.c"],
            include_dirs=fuse3_includes(),
            libraries=["dl"],
            extra_compile_args=["-O2", "-Wall"],
        ),
        # Also loaded with ctypes (scratchfs/squashfs/context.py); optional, like the hook.
        Extension(
            "scratchfs.squashfs._blockload",
            sources=["scratchfs/squashfs/_blockload.c"],
            extra_compile_args=["-O2", "-Wall"],
        ),
    ]
)
