"""compute-agent: keeps a hypervisor host's VMs in step with the cloud's database."""

__version__ = "0.1.0"
