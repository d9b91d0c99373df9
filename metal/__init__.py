"""Metal kernel sources of mlxq. Installed as the package data ``mlxq.metal``; read them
with ``mlxq.kernel_source.read_kernel_source``."""
