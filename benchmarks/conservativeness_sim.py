"""A step-by-step model of the scheduler's admission, reservation and retraction under the real
`--schedule-conservativeness auto` controller (radixserve/scheduler/conservativeness.py), for choosing the
controller's constants without GPU time:

    python benchmarks/conservativeness_sim.py

It models the H200 early-stopping run (`run_h200.sh conserv`): 4,096 requests of 25-45 prompt tokens that end
at "EOS" with probability 0.01 a token (max_new_tokens 1024), a 32,768-token pool, one prefill step admitting
everything that fits, else one decode step; retraction as Scheduler._ensure_decode_memory. It reproduced the
H200 figures of a06a32e (1.0: usage 0.51 vs 0.45 measured; auto: 6 retractions vs 5, usage 0.73 vs 0.69) and
chose RAISE x3 on every retraction and the doubled ratio after it (2 retractions in the first 12 s, then
none; usage 0.92 in the second half), and then the wait of one request lifetime between lowerings with the
aim at 0.93 (1 retraction on each of 8 seeds, against 1-2 without the wait; c600c57's H200 run had 2).

That run's prompts are 80 distinct chat prompts (~40 tokens, 24 shared), so after the first few admissions a
request costs the pool one or two tokens and its prompt is held once in the prefix cache: `cached=True`
models that (prompts of 1-2 tokens, 3,200 tokens of the pool held by the cached prompts). With it the model
reproduced 2cfa646's H200 run (2 retractions, settling at 0.363 against 0.402 measured, usage 0.76-0.78
against 0.75-0.76) where the first model had settled at 0.121 with one; on it stop 31 chose the raise of
x1.5 (x2 for a repeat within the minute) and the wait for the usage to stop rising (one retraction in ~60 s,
usage 0.87 in the second half, against two and 0.78). A model, not a measurement: the H200 figures are in
benchmarks/results.
"""

import random

import radixserve.scheduler.conservativeness as C


def run(
    value,
    n_req=4096,
    pool=32768,
    P=(25, 45),
    p_eos=0.01,
    max_new=1024,
    window=40,
    recovery=C.RECOVERY_STEPS,
    admit_ratio_auto=True,
    seed=0,
    retract_reset=C.RETRACT_RATIO_FACTOR,
    step_s=0.012,
    cached=False,
):
    """retract_reset: "sglang" (SGLang's reset from the running requests' progress) or the factor auto uses."""
    if cached:
        P, pool = (1, 2), pool - 3200
    rng = random.Random(seed)
    clock = [0.0]
    auto = C.AutoConservativeness(window, clock=lambda: clock[0]) if value == "auto" else None
    val = auto.value if auto else value
    state = {}

    def set_c(v, old):
        init = min(0.7 * v, 1.0)
        mn = init * 0.14
        dec = (init - mn) / 600
        r = state.get("ratio", init)
        if old:
            r = min(max(r * v / old, mn), 1.0)
        if old and auto is not None:
            dec = max(dec, (r - mn) / recovery)
        state.update(init=init, mn=mn, dec=dec, ratio=r)

    set_c(val, 0)
    cons = val
    # requests: [prompt, out, life, arrival]
    waiting = [[rng.randint(*P), 0, None, i] for i in range(n_req)]
    for w in waiting:
        life = 1
        while rng.random() > p_eos and life < max_new:
            life += 1
        w[2] = life
    running = []
    used = 0
    steps = 0
    dsteps = 0
    retr = 0
    retr_reqs = 0
    usage_q = []
    out_tokens = 0
    while waiting or running:
        steps += 1
        ratio = state["ratio"]
        reserve = sum(min(max_new - r[1], 4096) * ratio for r in running)
        rem = pool - used - reserve
        admitted = 0
        nr = ratio if (auto is not None and admit_ratio_auto) else 1.0
        if waiting:
            waiting.sort(key=lambda r: r[3])
            while waiting:
                r = waiting[0]
                ext = r[0] + r[1]
                fut = min(max_new - r[1], 4096) * nr
                if ext + fut > rem:
                    break
                rem -= ext + fut
                used += ext
                running.append(waiting.pop(0))
                admitted += 1
        if admitted:
            clock[0] += step_s
            continue
        # decode step
        need = len(running)
        if need > pool - used:
            victims = sorted(running, key=lambda r: (r[1], -r[0]), reverse=True)
            while len(victims) > 1:
                st = sum(min(20, max_new - r[1]) for r in victims)
                if pool - used >= st:
                    break
                v = victims.pop()
                running.remove(v)
                used -= v[0] + v[1]
                waiting.append(v)
                retr_reqs += 1
            retr += 1
            state.setdefault("rt", []).append(round(clock[0], 1))
            dec_tot = sum(r[1] for r in running)
            mx = max_new * len(running)
            if retract_reset == "sglang" or auto is None:
                state["ratio"] = min(1.0, (dec_tot + 20 * len(running)) / (mx + 1))
            else:
                state["ratio"] = min(1.0, state["ratio"] * retract_reset)
            if auto is not None:
                auto.on_retract()
                set_c(cons, cons)
        dsteps += 1
        clock[0] += step_s
        for r in running:
            r[1] += 1
        used += len(running)
        out_tokens += len(running)
        done = [r for r in running if r[1] >= r[2]]
        for r in done:
            if auto is not None:
                auto.on_finish()
            running.remove(r)
            used -= r[0] + r[1]
        state["ratio"] = max(state["ratio"] - state["dec"], state["mn"])
        u = used / pool
        if waiting:
            usage_q.append(u)
        if auto is not None:
            ch = auto.on_decode(u, len(waiting), len(running) + len(done))
            if ch:
                set_c(auto.value, cons)
                cons = auto.value
    return dict(
        steps=steps,
        dsteps=dsteps,
        retr=retr,
        retr_reqs=retr_reqs,
        usage_q=sum(usage_q) / max(len(usage_q), 1),
        late=sum(usage_q[len(usage_q) // 2 :]) / max(1, len(usage_q) - len(usage_q) // 2),
        secs=clock[0],
        final=cons,
        tok_per_step=out_tokens / steps,
        rt=state.get("rt", []),
    )


if __name__ == "__main__":
    for cached in (False, True):
        for n in (4096, 8192):
            for v in (1.0, "auto"):
                r = run(v, n_req=n, cached=cached)
                print(f"cached={cached} n={n}", v, {k: round(x, 3) if isinstance(x, float) else x for k, x in r.items()})
