"""Builds the optional C++ CPU backend ``ferret_kernels._C`` from csrc/ with ninja.

Without a C++ compiler (or torch at build time) the package still installs; it then
runs CPU tensors on the torch reference backend and says so once at first use.
"""

import glob
import sys

from setuptools import setup

ext_modules, cmdclass = [], {}
sources = sorted(glob.glob("csrc/*.cpp"))
try:
    from torch.utils.cpp_extension import BuildExtension, CppExtension
except ImportError:
    print("ferret-kernels: torch is not importable at build time; skipping the C++ backend", file=sys.stderr)
else:
    if sources:
        ext_modules.append(
            CppExtension(
                "ferret_kernels._C",
                sources,
                # -ffp-contract=off: no FMA contraction, or the bits would differ from the contract.
                extra_compile_args={"cxx": [
                    "-O3", "-std=c++17", "-ffp-contract=off", "-fopenmp",
                    # sqrtf never sets errno here (its argument is > 0); without this GCC
                    # keeps the errno branch and will not vectorise the Box-Muller loops.
                    # Changes no result bits (IEEE sqrt is correctly rounded either way).
                    "-fno-math-errno",
                ]},
                extra_link_args=["-fopenmp"],
            )
        )

        class OptionalBuildExtension(BuildExtension):
            """Warn instead of failing when the extension cannot be compiled."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - any compiler failure means "no extension"
                    print(f"ferret-kernels: C++ backend not built ({exc}); using the torch backend on CPU",
                          file=sys.stderr)

        cmdclass["build_ext"] = OptionalBuildExtension.with_options(use_ninja=True)

setup(ext_modules=ext_modules, cmdclass=cmdclass)
