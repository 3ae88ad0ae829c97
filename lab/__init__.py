"""kzprobe.lab: a simulated censoring ISP in network namespaces (see :mod:`kzprobe.lab.core`).

Importing this package is cheap (no scapy, no trustme): ``kzprobe --help`` and the click group
import it.
"""

from kzprobe.lab.core import Lab, LabError, destroy, down_all, instances
from kzprobe.lab.scenario import Scenario, ScenarioError, Site, load

__all__ = ["Lab", "LabError", "Scenario", "ScenarioError", "Site", "destroy", "down_all", "instances", "load"]
