"""Arrival counters that hand a tensor from one kernel of the decode step to the next without a kernel boundary.

A programmatic dependent's `griddepcontrol.wait` returns once the whole kernel before it has finished and its
writes are flushed: a few microseconds after its last program, for every node of the step (run 26 of
benchmarks/e2e-notes.md: a decode attention that only waits and returns costs ~4 us a layer). A consumer that
needs only part of the producer's output can instead count the producer's programs as they publish it: each
producer program stores its part and then `arrive`s (a release atomic on a counter in L2, adding the rows it
wrote, so that the count does not depend on how the producer splits its work); the consumer's programs spin on
the counter (`wait_arrivals`, acquire) and skip the grid wait.

It is safe because of how the step launches: a programmatic dependent starts only after every program of the
kernel before it has started, so when a consumer spins, all of its producer's programs are resident or done and
will arrive. The counters return to zero within each call (the consumer resets them once every reader is past),
so a captured graph replays them. Kernels that run in stream order (no PDL, the CPU interpreter) find the count
complete at once. The producer programs themselves passed their own grid wait before they arrive, so a consumer
past its spin sees every earlier kernel of the step complete, as one past `griddepcontrol.wait` would.
"""

import triton
import triton.language as tl


@triton.jit
def arrive(counter_ptr, count):
    """Publish this program's stores (every thread's) to the consumer, then add `count` to the counter."""
    tl.debug_barrier()
    tl.atomic_add(counter_ptr, count, sem="release", scope="gpu")


# a pause between polls, so that the waiting programs leave the L2 slice of their counter (and the issue slots of
# the SM they share with the producer) mostly alone; the result is a dummy, not pure so that it stays
PAUSE = tl.constexpr("nanosleep.u32 128; mov.u32 $0, 0;")


@triton.jit
def wait_arrivals(counter_ptr, need):
    """Spin until the count at counter_ptr reaches `need`; every thread's later loads see the stores counted. Polls
    with plain (volatile) loads and a pause; one acquire atomic once the count is complete orders what follows."""
    seen = tl.load(counter_ptr, volatile=True)
    while seen < need:
        tl.inline_asm_elementwise(PAUSE, "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        seen = tl.load(counter_ptr, volatile=True)
    tl.atomic_add(counter_ptr, 0, sem="acquire", scope="gpu")
    tl.debug_barrier()


@triton.jit
def pass_gate(gate_ptr, need, readers):
    """wait_arrivals on gate [0] for a kernel of `readers` programs, each reading all of the producer's output; the
    last reader past the gate resets it (gate [1] counts the readers past). A producer arrives there with 1."""
    wait_arrivals(gate_ptr, need)
    past = tl.atomic_add(gate_ptr + 1, 1, sem="relaxed", scope="gpu")
    if past == readers - 1:
        tl.store(gate_ptr, 0)
        tl.store(gate_ptr + 1, 0)
