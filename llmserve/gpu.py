"""GPU readings through NVML, for the metrics. On a host without an NVIDIA driver there are none, and
nothing fails: the GPU series are simply absent."""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GpuReading:
    index: int
    name: str
    utilization: float  # share of the last sample period a kernel ran, 0..1
    memory_used: int  # bytes
    memory_total: int  # bytes


class GpuMonitor:
    def __init__(self) -> None:
        self._handles: list[object] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except Exception as exc:  # no library, no driver, no device: all mean "no GPU metrics"
            log.debug("no NVML GPU metrics: %s", exc)
            return
        log.info("GPU metrics for %d device(s) through NVML", len(self._handles))

    def read(self) -> list[GpuReading]:
        if not self._handles:
            return []
        import pynvml

        readings = []
        for index, handle in enumerate(self._handles):
            try:
                memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
                utilization = pynvml.nvmlDeviceGetUtilizationRates(handle)
                name = pynvml.nvmlDeviceGetName(handle)
            except pynvml.NVMLError as exc:
                log.warning("GPU %d: NVML reading failed: %s", index, exc)
                continue
            readings.append(
                GpuReading(
                    index=index,
                    name=name.decode() if isinstance(name, bytes) else str(name),
                    utilization=utilization.gpu / 100.0,
                    memory_used=int(memory.used),
                    memory_total=int(memory.total),
                )
            )
        return readings
