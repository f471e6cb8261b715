"""The package's losses inside other projects' trainers; each module imports its trainer's
package (an optional dependency): ``integrations.trl`` needs ``pip install gkl-kernels[trl]``."""
