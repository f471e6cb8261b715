"""The H100 MODEL of ``python -m bench``, not a measurement: the time of counted memory traffic and
kernel launches on an H100 (``modelled_h100_seconds``, the last column of part 4's traffic table)
and the modelled step of ``gkl_loss[triton]`` against ``F.kl_div`` at the ImageNet shape, with its
goal (part 3 and the closing line of ``python -m bench``).

The time is ``bytes / 3.35e12 B/s`` (the H100 SXM's HBM3 bandwidth) plus ``launches x 4 us`` (an
assumed launch overhead); no GPU is timed. The bytes and launches are the bench's counts
(``bench.traffic.count_case``, under Triton's interpreter and ``DispatchCounter``);
``bench.traffic.count_modelled_step`` counts the step that ``modelled_step`` models (``python -m
bench.traffic --steps`` runs it, a subprocess of ``python -m bench``).
"""

from bench.cases import IMAGENET, PRIOR, Case
from bench.overhead import HOST_STEP_CASE
from bench.report import format_bytes, format_seconds, speed

H100_BANDWIDTH_BYTES_PER_SECOND = 3.35e12  # H100 SXM, HBM3
LAUNCH_LATENCY_SECONDS = 4e-6
MODEL_LABEL = ("model, not a measurement: counted bytes / H100 HBM3 bandwidth + counted launches "
               "x assumed launch latency")
H100_STEP_CASE = Case("imagenet", 256, 1000, PRIOR, IMAGENET)  # the bench's ImageNet case
H100_STEP_TARGET = 0.3  # gkl_loss[triton]'s modelled step at most this share of F.kl_div's
MODELLED_GOAL = (f"the project's goal that on an H100 a step of the Triton kernels costs at most "
                 f"{H100_STEP_TARGET:g}x plain KD's (F.kl_div's), so GKL is the cheaper loss")


def modelled_h100_seconds(nbytes, launches):
    """A MODEL of an H100's time for ``nbytes`` of DRAM traffic in ``launches`` kernels:
    ``nbytes / H100_BANDWIDTH_BYTES_PER_SECOND + launches * LAUNCH_LATENCY_SECONDS``.
    ``LAUNCH_LATENCY_SECONDS`` (4 us) is an assumption of the model, typical of CUDA kernel
    launch overhead; no GPU was timed."""
    return nbytes / H100_BANDWIDTH_BYTES_PER_SECOND + launches * LAUNCH_LATENCY_SECONDS


def model_constants():
    """The model's label and constants, as the JSON rows carry them."""
    return {"label": MODEL_LABEL, "bandwidth_bytes_per_second": H100_BANDWIDTH_BYTES_PER_SECOND,
            "launch_latency_seconds": LAUNCH_LATENCY_SECONDS}


def modelled_step(case, counted):
    """The modelled H100 time (``modelled_h100_seconds``, a MODEL) of one training step of
    ``gkl_loss[triton]`` and of ``F.kl_div`` on ``case``, and their ratio with its target
    ``H100_STEP_TARGET``. ``counted``: ``(provider, CaseTraffic, host seconds)`` of each,
    ``gkl_loss[triton]`` first: the bytes and launches of the whole step (forward and backward)
    that ``bench.traffic.count_case`` counts at the case's shape, and the measured host time of a
    step at ``HOST_STEP_CASE``'s shape (``bench.overhead``'s goal), kept beside the model."""
    steps = []
    for provider, traffic, host_seconds in counted:
        total = traffic.total
        steps.append({"provider": provider, "bytes": total.bytes, "launches": total.launches,
                      "forward_launches": traffic.forward.launches,
                      "backward_launches": traffic.backward.launches,
                      "host_syncs": total.host_syncs,
                      "modelled_seconds": modelled_h100_seconds(total.bytes, total.launches),
                      "host_seconds": host_seconds})
    ratio = steps[0]["modelled_seconds"] / steps[1]["modelled_seconds"]
    return {"case": case.name, "batch": case.batch, "classes": case.classes,
            "dtype": case.dtype, "weights": case.weights, "steps": steps, "ratio": ratio,
            "target": H100_STEP_TARGET, "met": ratio <= H100_STEP_TARGET,
            "host_batch": HOST_STEP_CASE.batch, "host_classes": HOST_STEP_CASE.classes,
            "model": model_constants()}


def format_modelled_step(row):
    """The modelled step as three lines: the ratio, its target, what the model is made of."""
    package, kl_div = row["steps"]
    verdict = "met" if row["met"] else "MISSED"
    details = "; ".join(
        f"{step['provider']} {format_bytes(step['bytes'])} in {step['launches']} launches "
        f"(fwd {step['forward_launches']} + bwd {step['backward_launches']}), "
        f"{step['host_syncs']} syncs" for step in row["steps"])
    model = row["model"]
    return (f"modelled (not measured) H100 step at B={row['batch']} C={row['classes']} "
            f"{row['dtype']}, {row['weights']} weights, forward+backward: {package['provider']} "
            f"{format_seconds(package['modelled_seconds'])} vs {kl_div['provider']} "
            f"{format_seconds(kl_div['modelled_seconds'])} = {row['ratio']:.2f}x "
            f"(target: at most {row['target']:g}x: {verdict}), i.e. "
            f"{speed(1 / row['ratio'])} than {kl_div['provider']}\n"
            f"  target: {MODELLED_GOAL}\n"
            f"  a MODEL, no GPU was timed: bytes / {model['bandwidth_bytes_per_second'] / 1e12:.2f}"
            f" TB/s (H100 SXM HBM3) + launches x {model['launch_latency_seconds'] * 1e6:g} us "
            f"(assumed); bytes and launches of the whole step counted under Triton's interpreter "
            f"and DispatchCounter at that shape: {details}")


def modelled_headline(row):
    """The modelled step as one closing line, labelled as a model."""
    package, kl_div = row["steps"]
    verdict = "met" if row["met"] else "MISSED"
    return (f"MODELLED, not measured: one H100 step at B={row['batch']} C={row['classes']} "
            f"{row['dtype']}: {package['provider']} would be "
            f"{speed(1 / row['ratio'])} than {kl_div['provider']} (goal: at least "
            f"{1 / row['target']:.1f}x faster, so that on a GPU GKL costs less than plain KD: "
            f"{verdict})")
