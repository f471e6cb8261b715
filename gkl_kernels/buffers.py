"""Gradient buffers of the backward passes, shared by every launcher and by the custom ops' fake
(shape-only) implementations: ``(B, C)`` contiguous in each input's dtype when needed, else an
empty tensor."""

import torch


def empty_gradients(student, teacher, need_ds, need_dt):
    """Uninitialised ``(grad_student, grad_teacher)`` for a kernel to write."""
    batch, num_classes = student.shape
    ds = torch.empty((batch, num_classes) if need_ds else (0,), dtype=student.dtype,
                     device=student.device)
    dt = torch.empty((batch, num_classes) if need_dt else (0,), dtype=teacher.dtype,
                     device=teacher.device)
    return ds, dt


def fake_gradients(student, teacher, need_ds, need_dt):
    """The same shapes, dtypes and (contiguous) strides, for ``register_fake``."""
    ds = torch.empty_like(student, memory_format=torch.contiguous_format) if need_ds \
        else student.new_empty(0)
    dt = torch.empty_like(teacher, memory_format=torch.contiguous_format) if need_dt \
        else teacher.new_empty(0)
    return ds, dt
