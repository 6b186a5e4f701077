"""``python -m shardgrok.kernels``: what is built, which instruction set is in use, and why a
backend is unavailable (the emulated CUDA target, a testing backend, is built to be reported). Exit status 0 when the CPU kernel is available (it also builds the
plans of CUDA steps), 1 otherwise; an unavailable CUDA kernel on a machine without a GPU is no
failure."""
import sys

from . import status


def main() -> int:
    s = status(emulated=True)
    cpu = s["cpu"]
    print(f"default backend: {s['default_backend']}")
    if cpu["available"]:
        print(f"cpu kernel: available ({cpu['origin']})")
        print(f"  instruction set in use: {cpu['isa']} (supported here: "
              f"{', '.join(cpu['supported_isas'])})")
    else:
        print(f"cpu kernel: unavailable: {cpu['reason']}")
    gpu = s["cuda"]
    if gpu["available"]:
        print(f"cuda kernel: available ({gpu['origin']})")
        print(f"  devices: {', '.join(gpu['devices'])}; built for: {gpu['arch_list']}")
    else:
        print(f"cuda kernel: unavailable: {gpu['reason']}")
    emu = s["cuda_emulated"]
    if emu["available"]:
        print(f"cuda-emulated (testing backend): available ({emu['origin']})")
    else:
        print(f"cuda-emulated (testing backend): unavailable: {emu['reason']}")
    return 0 if cpu["available"] else 1


if __name__ == "__main__":
    sys.exit(main())
