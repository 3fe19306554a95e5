# Finds libtorch (through a Python installation of torch unless the caller
# already found it or set Torch_DIR) and the CUDA toolkit. Used by hostfuse's
# own build and, installed next to hostfuseConfig.cmake, by projects that
# call find_package(hostfuse).
#
# Sets TORCH_LIBRARIES (from TorchConfig) and the imported targets torch,
# CUDA::cudart and CUDA::nvrtc. HOSTFUSE_PYTHON names the Python whose torch
# to use; without it, the first python3 on the PATH.

find_package(CUDAToolkit REQUIRED)

if(NOT TARGET torch)
  if(NOT Torch_DIR)
    if(NOT HOSTFUSE_PYTHON)
      find_package(Python3 COMPONENTS Interpreter REQUIRED)
      set(HOSTFUSE_PYTHON "${Python3_EXECUTABLE}")
    endif()
    execute_process(
      COMMAND "${HOSTFUSE_PYTHON}" -c
              "import torch; print(torch.utils.cmake_prefix_path); print(torch.__version__)"
      OUTPUT_VARIABLE _hostfuse_torch_info
      RESULT_VARIABLE _hostfuse_torch_result
      ERROR_VARIABLE _hostfuse_torch_error
      OUTPUT_STRIP_TRAILING_WHITESPACE)
    if(NOT _hostfuse_torch_result EQUAL 0 AND SKBUILD)
      message(FATAL_ERROR
              "hostfuse builds against the torch of the environment it is "
              "installed into, but pip's build environment (${HOSTFUSE_PYTHON}) "
              "has none: install with\n"
              "  pip install --no-build-isolation --no-deps .\n"
              "in an environment that has torch 2.11 and scikit-build-core.")
    elseif(NOT _hostfuse_torch_result EQUAL 0)
      message(FATAL_ERROR
              "hostfuse needs torch 2.11 importable from ${HOSTFUSE_PYTHON}:\n"
              "${_hostfuse_torch_error}\n"
              "Pass -DHOSTFUSE_PYTHON=/path/to/python (one that imports "
              "torch 2.11) or -DTorch_DIR=<libtorch>/share/cmake/Torch; in "
              "hostfuse's own tree, tools/setup.sh picks the Python.")
    endif()
    string(REPLACE "\n" ";" _hostfuse_torch_info "${_hostfuse_torch_info}")
    list(GET _hostfuse_torch_info 0 _hostfuse_torch_prefix)
    list(GET _hostfuse_torch_info 1 _hostfuse_torch_version)
    message(STATUS "hostfuse: torch ${_hostfuse_torch_version} from "
                   "${HOSTFUSE_PYTHON}")
    set(Torch_DIR "${_hostfuse_torch_prefix}/Torch")
  endif()
  # Torch's CUDA set-up asks for an architecture list; sm_90 is hostfuse's
  # target, and naming it keeps the configure step from guessing on
  # machines without GPUs.
  if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
    set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
  endif()
  find_package(Torch REQUIRED)
  if(NOT Torch_VERSION MATCHES "^2\\.11\\.")
    message(WARNING "hostfuse is built and tested against torch 2.11; "
                    "found torch ${Torch_VERSION} at ${Torch_DIR}")
  endif()
endif()
