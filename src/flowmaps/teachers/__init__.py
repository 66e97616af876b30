"""Teachers: anything that yields the velocity ``v(x, t, cond)`` in this project's convention
(``base``), and ``load_teacher`` for the command line's ``--teacher`` (``loading``)."""

from flowmaps.teachers.base import ExactTeacher, FlowMapTeacher, Teacher, VelocityTeacher
from flowmaps.teachers.loading import load_teacher

__all__ = ["Teacher", "ExactTeacher", "FlowMapTeacher", "VelocityTeacher", "load_teacher"]
