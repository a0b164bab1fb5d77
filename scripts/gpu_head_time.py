import torch, triton
from kernels.exit_head import exit_head, head_state
V, D = 32000, 4096
dev = "cuda"
lm = (torch.randn(V, D, device=dev) * 0.02).half()
x = torch.randn(D, device=dev).half(); w = torch.ones(D, device=dev).half()
ctl = torch.zeros(40, dtype=torch.int32, device=dev); st = head_state(torch.device(dev))
hn = torch.zeros(D, device=dev).half(); top4 = torch.zeros(4, dtype=torch.long, device=dev)
res = {}
for prog in (132, 264, 528, 1056):
    for bv, bd in ((32, 512), (16, 1024), (64, 256)):
        f = lambda: (ctl.zero_(), exit_head(x, None, w, 1e-5, lm, hn, top4, ctl, st, 31, final=True, programs=prog, block_v=bv, block_d=bd))
        f(); torch.cuda.synchronize()
        res[(prog, bv, bd)] = triton.testing.do_bench_cudagraph(f)
g = lambda: (ctl.zero_(), torch.nn.functional.linear(x[None], lm).argmax(-1))
res["cublas+argmax"] = triton.testing.do_bench_cudagraph(g)
z = lambda: ctl.zero_()
res["zero_only"] = triton.testing.do_bench_cudagraph(z)
for k, v in res.items(): print(k, round(v * 1000, 1), "us")
