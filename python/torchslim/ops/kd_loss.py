"""kd_kl_div (placeholder: pure PyTorch until the kernel lands)."""
from torchslim.ops._reference import ref_kd_kl_div


def kd_kl_div(student_logits, teacher_logits, temperature=1.0, reduction="batchmean"):
    """T**2 * KL(softmax(teacher/T) || softmax(student/T))."""
    return ref_kd_kl_div(student_logits, teacher_logits.detach(), temperature, reduction)
