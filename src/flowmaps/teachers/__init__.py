"""Teachers: anything that yields the velocity ``v(x, t, cond)`` in this project's convention
(``base``), guided teachers (``guidance``), teachers in other conventions (``conventions``; diffusers UNets in
``diffusers``, the ``diffusers`` extra), and ``load_teacher`` for the command line's ``--teacher`` (``loading``)."""

from flowmaps.teachers.base import ExactTeacher, FlowMapTeacher, Teacher, VelocityTeacher
from flowmaps.teachers.conventions import ConventionTeacher
from flowmaps.teachers.guidance import GuidedTeacher
from flowmaps.teachers.loading import load_teacher

__all__ = ["Teacher", "ExactTeacher", "FlowMapTeacher", "VelocityTeacher", "GuidedTeacher", "ConventionTeacher",
           "load_teacher"]
