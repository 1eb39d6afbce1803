"""Build the Cython core. ARMONIK_ZMQ_DEBUG=1 builds with line tracing, bounds checks and annotation."""

import os

from Cython.Build import cythonize
from setuptools import Extension, setup

DEBUG = os.environ.get("ARMONIK_ZMQ_DEBUG") == "1"

directives = {
    "language_level": "3",
    "boundscheck": DEBUG,
    "wraparound": False,
    "cdivision": True,
    "initializedcheck": DEBUG,
    "linetrace": DEBUG,
}
macros = [("CYTHON_TRACE_NOGIL", "1")] if DEBUG else []

extensions = [
    Extension(
        "armonik_zmq._core",
        ["armonik_zmq/_core.pyx"],
        language="c++",
        extra_compile_args=["-O2", "-std=c++17"] + ([] if DEBUG else ["-DNDEBUG"]),
        define_macros=macros,
    )
]

setup(ext_modules=cythonize(extensions, compiler_directives=directives, annotate=DEBUG))
