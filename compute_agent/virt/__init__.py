"""Virt drivers: the agent's only way to reach a hypervisor."""
