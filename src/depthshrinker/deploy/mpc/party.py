"""What runs inside each child process of ``engine``: party 0 (model owner), party 1 (client) and, with the TTP
provider, the dealer (rank 2). See ``engine`` for the protocol, the phases and the threat model.

The parties mirror ``PlainNet.forward`` with CrypTen's own ops (``secure_forward``), trace the tuples each network
needs once, then per run fill CrypTen's tuple cache (preprocessing; the owner's dealer requests batched into one
round trip) and evaluate from it (online), counting each phase apart. The dealer is CrypTen's ``TTPServer``
logic in a loop that fails loudly. Test hooks (environment): ``FAULT_ENV`` makes one process raise, exit 0, hang
or die; ``SPY_ENV`` records a party's view of the first opening.
"""
from __future__ import annotations

import faulthandler
import json
import os
import pickle
import shutil
import signal
import sys
import threading
import time

import torch

from depthshrinker.base.bits import decode_bits

from .compat import MPCError, import_crypten

OWNER, CLIENT, DEALER = 0, 1, 2
NAMES = ("party 0 (model owner)", "party 1 (client)", "dealer (rank 2)")
ROLES = ("owner", "client", "dealer")
SECURE_ACTS = {"none": lambda x: x, "relu": lambda x: x.relu(), "relu6": lambda x: x.hardtanh(0, 6)}
ENTRY = "from depthshrinker.deploy.mpc.party import _process_main; _process_main()"
FAULT_ENV = "DEPTHSHRINKER_MPC_FAULT"   # tests only: "<owner|client|dealer>:<raise|exit0|hang|kill>"
SPY_ENV = "DEPTHSHRINKER_MPC_SPY"       # tests only: record each party's view of the first opened values
BATCH = "batch"                         # dealer message: a list of TTP requests answered in one round trip


def secure_act(y, conv: dict):
    """The activation of a conv spec (or ``plain.free_act_spec``) on a CrypTensor; with an SNL mask (public),
    only the kept elements go through it: gather them by index, activate, add the difference back."""
    act = SECURE_ACTS[conv["act"]]
    if not conv.get("mask") or conv["act"] == "none":
        return act(y)
    mask = conv["mask"]
    keep = decode_bits(mask["bits"], mask["shape"]).expand(1, *y.shape[1:]).flatten().nonzero().flatten()
    flat = y.flatten()
    kept = flat.index_select(0, keep)
    return flat.index_add(0, keep, act(kept) - kept).view(y.shape)


def _max_along(x, dim: int, k: int, s: int, p: int):
    """Max over windows of ``k`` along ``dim`` (stride ``s``), the border replicated ``p`` times on each side:
    ``m + relu(x − m)`` over the window's ``k`` strided slices (``k − 1`` ReLU layers)."""
    if p:
        crypten = import_crypten()
        size = x.size(dim)
        first, last = x.narrow(dim, 0, 1), x.narrow(dim, size - 1, 1)
        x = crypten.cat([first] * p + [x] + [last] * p, dim=dim)
    out = (x.size(dim) - k) // s + 1
    index = [slice(None)] * x.dim()
    slices = []
    for t in range(k):
        index[dim] = slice(t, t + s * (out - 1) + 1, s)
        slices.append(x[tuple(index)])
    m = slices[0]
    for y in slices[1:]:
        m = m + (y - m).relu()
    return m


def secure_max_pool(x, pool: dict):
    """``max_pool2d`` on a CrypTensor, separably (rows, then columns) with replicate padding, which equals torch's
    -inf padding (``cost.max_pool``)."""
    k, s, p = pool["kernel"], pool["stride"], pool["padding"]
    return _max_along(_max_along(x, 3, k, s, p), 2, k, s, p)


def _secure_conv(x, conv: dict, params: dict, name: str):
    y = x.conv2d(params[name + "weight"], stride=conv["stride"], padding=conv["padding"], groups=conv["groups"])
    return y + params[name + "bias"].view(1, -1, 1, 1)


def secure_forward(spec: dict, params: dict, x):
    """Mirror ``PlainNet.forward`` on CrypTensors; ``params`` maps state_dict names to shared parameters."""
    for i, block in enumerate(spec["blocks"]):
        if block.get("pool"):
            x = secure_max_pool(x, block["pool"])
            continue
        y = x
        for j, conv in enumerate(block["convs"]):
            y = secure_act(_secure_conv(y, conv, params, f"blocks.{i}.convs.{j}."), conv)
        if block.get("shortcut"):
            y = y + _secure_conv(x, block["shortcut"], params, f"blocks.{i}.shortcut.")
        elif block.get("residual"):
            y = y + x
        x = secure_act(y, {"act": block.get("free_act", "none"), "mask": block.get("free_mask")})
    return x.mean((2, 3)).matmul(params["classifier.weight"].t()) + params["classifier.bias"]


def _fault(rank: int) -> None:
    """Test hook: misbehave here when ``FAULT_ENV`` names this process."""
    role, _, kind = os.environ.get(FAULT_ENV, "").partition(":")
    if role != ROLES[rank]:
        return
    if kind == "raise":
        raise RuntimeError(f"injected fault in the {role}")
    if kind == "exit0":
        sys.stdout.flush()
        os._exit(0)
    if kind == "hang":
        time.sleep(3600)
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)


def _setup(rank: int, rendezvous: str, provider: str, threads: int, parent: int, workdir: str):
    """Common start of a child: die with the caller, dump stacks on SIGUSR1, join the rendezvous."""
    def watch():   # exit when the caller dies (even by SIGKILL) and remove the folder it could not
        while os.getppid() == parent:
            time.sleep(0.5)
        shutil.rmtree(workdir, ignore_errors=True)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # the caller asks where a hung process is
    torch.set_num_threads(threads)
    crypten = import_crypten()
    crypten.cfg.mpc.provider = provider.upper()
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", RENDEZVOUS=rendezvous, DISTRIBUTED_BACKEND="gloo")
    crypten.init()   # with TTP: world of 2 parties + the dealer (rank 2), groups main / ttp / ttp_comm
    return crypten


def _dealer(rank: int, out: str, **setup) -> None:
    """The dealer: CrypTen's TTPServer logic, with a loop that fails loudly (TTPServer returns quietly when a
    party disappears) and only writes its result after the owner's ``terminate``."""
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)   # the parties' seeds come from here
    crypten = _setup(rank, **setup)
    from crypten.mpc.provider.ttp_provider import TTPServer

    comm = crypten.communicator.get()
    server = TTPServer.__new__(TTPServer)   # its __init__ would run the quiet loop
    server.ttp_group, server.comm_group, server.device = comm.ttp_group, comm.ttp_comm_group, "cpu"
    server._setup_generators()
    def serve(message: dict) -> torch.Tensor:
        server.device = message["device"]
        return getattr(server, message["function"])(*message["args"], **message["kwargs"])

    requests, busy = 0, 0.0
    while True:
        message = comm.recv_obj(OWNER, server.ttp_group)
        if message == "terminate":
            break
        _fault(rank)
        start = time.perf_counter()
        batch = message["messages"] if message["function"] == BATCH else [message]   # in order: PRNGs in step
        results = [serve(m) for m in batch]
        result = torch.cat([r.reshape(-1) for r in results]) if message["function"] == BATCH else results[0]
        busy += time.perf_counter() - start
        comm.send_obj([r.size() for r in results] if message["function"] == BATCH else result.size(), OWNER,
                      server.ttp_group)
        comm.broadcast(result, comm.get_ttp_rank(), server.comm_group)
        requests += len(batch)
    torch.save({"requests": requests, "busy_s": busy}, out + ".part")
    os.replace(out + ".part", out)


def _result_size(function: str, *args, **kwargs) -> torch.Size:
    """Shape of what the dealer returns for one TTP request (``TTPServer``'s five functions)."""
    if function == "additive":   # args: size0, size1, op, *op_args
        meta = [torch.empty(size, dtype=torch.long, device="meta") for size in args[:2]]
        return getattr(torch, args[2])(*meta, *args[3:], **kwargs).size()
    if function == "binary":
        return torch.broadcast_shapes(args[0], args[1])
    return torch.Size(args[0])   # square, wraps, B2A


def _count_dealer_traffic(crypten, provider, meter: dict) -> None:
    """Owner, TTP: count its dealer requests in ``meter`` (tuple requests, randomness bytes, control bytes,
    seconds), keep them out of CrypTen's party-to-party counters, and serve each ``fill_cache`` with ONE dealer
    round trip: CrypTen's TTP code runs unchanged against a stand-in request that records the message and
    returns an empty tensor of the result's shape; the dealer computes all results in that order (so the PRNG
    streams stay in step) and they are copied into those tensors (``from_shares`` keeps them, uncopied)."""
    from crypten.mpc.provider.ttp_provider import TTPClient

    client = type(TTPClient.get())
    request, fill = client.ttp_request, provider.fill_cache

    def message(function, device, *args, **kwargs) -> dict:
        return {"function": function, "device": None if device is None else str(device), "args": args,
                "kwargs": kwargs}

    def off_the_books(exchange):
        """Run a dealer exchange; count it in ``meter``, not in CrypTen's counters."""
        comm = crypten.communicator.get()
        saved = comm.comm_rounds, comm.comm_bytes, comm.comm_time
        start = time.perf_counter()
        result = exchange(comm)
        meter["seconds"] += time.perf_counter() - start
        comm.comm_rounds, comm.comm_bytes, comm.comm_time = saved
        return result

    def counted(self, function, device, *args, **kwargs):   # one request, one round trip (the tracing pass)
        result = off_the_books(lambda comm: request(self, function, device, *args, **kwargs))
        meter["requests"] += 1
        meter["bytes"] += result.numel() * 8
        meter["control_bytes"] += 8 + len(pickle.dumps(message(function, device, *args, **kwargs))) + \
            len(pickle.dumps(result.size()))   # + the two messages' 4-byte length headers
        return result

    def batched_fill():
        pending = []

        def deferred(self, function, device, *args, **kwargs):
            pending.append((message(function, device, *args, **kwargs),
                            torch.empty(_result_size(function, *args, **kwargs), dtype=torch.long)))
            return pending[-1][1]

        client.ttp_request = deferred
        try:
            fill()
        finally:
            client.ttp_request = counted
        if not pending:
            return
        batch = {"function": BATCH, "messages": [m for m, _ in pending]}
        flat = torch.empty(sum(t.numel() for _, t in pending), dtype=torch.long)

        def exchange(comm):
            comm.send_obj(batch, DEALER, comm.ttp_group)
            sizes = comm.recv_obj(DEALER, comm.ttp_group)
            if list(sizes) != [t.size() for _, t in pending]:
                raise MPCError("the dealer's results do not have the requested shapes")
            comm.broadcast(flat, DEALER, comm.ttp_comm_group)
            return sizes

        sizes = off_the_books(exchange)
        offset = 0
        for _, tensor in pending:
            tensor.view(-1).copy_(flat[offset:offset + tensor.numel()])
            offset += tensor.numel()
        meter["requests"] += len(pending)
        meter["bytes"] += flat.numel() * 8
        meter["control_bytes"] += 8 + len(pickle.dumps(batch)) + len(pickle.dumps(sizes))

    client.ttp_request = counted
    provider.fill_cache = batched_fill


def _shape_only_client_products() -> None:
    """CrypTen's TTP client (rank 1) computes ``op(a, b)`` of its random shares only to learn the product's shape,
    a full int64 conv (0.3 s for one 96×32×32 depthwise layer on this box): compute that shape on meta tensors.
    Only in the parties; the dealer computes the real product."""
    from crypten.mpc.provider import ttp_provider

    class ShapeOnly:
        def __getattr__(self, name):
            real = getattr(torch, name)
            if name not in ("mul", "matmul", "conv1d", "conv2d", "conv_transpose1d", "conv_transpose2d"):
                return real
            return lambda a, b, *args, **kwargs: real(a.to("meta"), b.to("meta"), *args, **kwargs)

    ttp_provider.torch = ShapeOnly()


def _spy(crypten, view: dict) -> None:
    """Test hook: record, until the first Beaver opening, every ring tensor this party's tuple provider draws
    (its plaintext tuples under TFP, its shares under TTP) and then the opened values."""
    from crypten.mpc.primitives import ArithmeticSharedTensor
    from crypten.mpc.provider import tfp_provider, ttp_provider

    view.update(drawn=[], opened=None)
    for module in (tfp_provider, ttp_provider):
        for name in ("generate_random_ring_element", "generate_kbit_random_tensor"):
            def drawing(*args, _draw=getattr(module, name), **kwargs):
                tensor = _draw(*args, **kwargs)
                if view["opened"] is None:
                    view["drawn"].append(tensor.clone())
                return tensor
            setattr(module, name, drawing)
    reveal = ArithmeticSharedTensor.reveal_batch

    def revealing(tensors, dst=None):
        opened = reveal(tensors, dst=dst)
        if view["opened"] is None:
            view["opened"] = [t.clone() for t in opened]
        return opened

    ArithmeticSharedTensor.reveal_batch = staticmethod(revealing)


def _party(rank: int, job: str, out: str, runs: int, warmup: int, **setup) -> None:
    crypten = _setup(rank, **setup)
    crypten.cfg.communicator.verbose = True   # CrypTen counts bytes and rounds only when verbose
    comm, provider = crypten.communicator.get(), crypten.mpc.get_default_provider()
    meter = dict.fromkeys(("requests", "bytes", "control_bytes", "seconds"), 0)
    if crypten.mpc.ttp_required():
        _shape_only_client_products()
        if rank == OWNER:
            _count_dealer_traffic(crypten, provider, meter)
    view = {}
    if os.environ.get(SPY_ENV):
        _spy(crypten, view)
    data = torch.load(job, weights_only=True)
    nets = []
    for i, spec in enumerate(json.loads(data["specs"])):
        values = data["state_dicts"][i] if rank == OWNER else {k: torch.zeros(s) for k, s in data["shapes"][i].items()}
        nets.append((spec, {k: crypten.cryptensor(v, src=OWNER) for k, v in values.items()}))
    image = data["x"] if rank == CLIENT else torch.zeros(data["input_shape"].tolist())

    def phase(work):
        """(result, seconds, party-to-party bytes and rounds, dealer counts) of ``work()`` after a barrier."""
        comm.barrier()
        comm.reset_communication_stats()
        meter.update(dict.fromkeys(meter, 0))
        start = time.perf_counter()
        result = work()
        elapsed = time.perf_counter() - start
        counted = comm.get_communication_stats()
        return result, elapsed, [counted["bytes"], counted["rounds"]], [meter[k] for k in ("bytes", "requests",
                                                                                          "control_bytes", "seconds")]

    def online(spec, params):
        return secure_forward(spec, params, crypten.cryptensor(image, src=CLIENT)).get_plain_text(dst=CLIENT)

    requests = [None for _ in nets]
    record = {key: [[] for _ in nets] for key in ("online_s", "online", "preproc_s", "preproc", "preproc_p2p")}
    logits = [None for _ in nets]
    passes = max(warmup, 1) + runs   # the first pass traces the tuples each network needs (untimed)
    for step in range(passes):
        if step == 1:
            _fault(rank)
        for i in [(step + k) % len(nets) for k in range(len(nets))]:   # order rotated every run
            spec, params = nets[i]
            if requests[i] is None:
                provider.trace(True)
                logits[i] = online(spec, params)
                provider.trace(False)
                requests[i], provider.request_cache = provider.request_cache, []
                continue
            provider.request_cache = list(requests[i])
            _, pre_s, pre_p2p, pre = phase(provider.fill_cache)
            provider.request_cache = []
            logits[i], on_s, on, dealt = phase(lambda: online(spec, params))
            left = sum(len(tuples) for tuples in provider.tuple_cache.values())
            provider.tuple_cache = {}
            if dealt[1] or left:
                raise MPCError(f"online phase of network {i} was not served by its preprocessing ({dealt[1]} dealer "
                               f"requests, {left} tuples left over)")
            if step >= passes - runs:
                for key, value in zip(record, (on_s, on, pre_s, pre, pre_p2p)):
                    record[key][i].append(value)
    crypten.uninit()   # the owner tells the dealer to stop
    result = {"online_s": torch.tensor(record["online_s"], dtype=torch.float64),
              "preproc_s": torch.tensor(record["preproc_s"], dtype=torch.float64),
              "preproc": torch.tensor(record["preproc"], dtype=torch.float64),
              **{key: torch.tensor(record[key], dtype=torch.int64) for key in ("online", "preproc_p2p")}}
    if rank == CLIENT:
        result["logits"] = logits
    if view:
        result["view"] = view
    torch.save(result, out + ".part")
    os.replace(out + ".part", out)   # a result file exists only for a process that finished


def _process_main() -> None:
    args = json.loads(sys.argv[1])
    (_dealer if args["rank"] == DEALER else _party)(**args)
