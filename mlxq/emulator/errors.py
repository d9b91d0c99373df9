"""Exceptions raised by the emulator; each message names the kernel."""


class EmulatorError(RuntimeError):
    """Base class for everything the emulator reports about a kernel."""


class UnsupportedFeatureError(EmulatorError):
    """The kernel uses a Metal feature the emulator does not implement (atomics, textures, ...)."""


class KernelCompileError(EmulatorError):
    """The kernel text did not compile; the message shows the offending body lines."""


class KernelRuntimeError(EmulatorError):
    """A launch found a bug: divergent barrier, deadlock, out-of-bounds buffer access."""
