# Finds libtorch through a Python installation of torch and the CUDA toolkit.
#
# Sets TORCH_LIBRARIES (from TorchConfig), HOSTFUSE_TORCH_LIBRARY_DIR, the
# imported targets CUDA::cudart and CUDA::nvrtc, and HOSTFUSE_WARNING_FLAGS.

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
if(NOT _hostfuse_torch_result EQUAL 0)
  message(FATAL_ERROR
          "hostfuse needs torch 2.11 importable from ${HOSTFUSE_PYTHON}:\n"
          "${_hostfuse_torch_error}\n"
          "Run tools/setup.sh, or pass -DHOSTFUSE_PYTHON=/path/to/python.")
endif()
string(REPLACE "\n" ";" _hostfuse_torch_info "${_hostfuse_torch_info}")
list(GET _hostfuse_torch_info 0 _hostfuse_torch_prefix)
list(GET _hostfuse_torch_info 1 HOSTFUSE_TORCH_VERSION)
if(NOT HOSTFUSE_TORCH_VERSION MATCHES "^2\\.11\\.")
  message(WARNING "hostfuse is built and tested against torch 2.11; "
                  "${HOSTFUSE_PYTHON} has torch ${HOSTFUSE_TORCH_VERSION}")
endif()
message(STATUS "hostfuse: torch ${HOSTFUSE_TORCH_VERSION} from ${HOSTFUSE_PYTHON}")
list(PREPEND CMAKE_PREFIX_PATH "${_hostfuse_torch_prefix}")

# Torch's CUDA setup asks for an architecture list; sm_90 is the target, and
# naming it keeps the configure step from guessing on machines without GPUs.
if(NOT DEFINED ENV{TORCH_CUDA_ARCH_LIST})
  set(ENV{TORCH_CUDA_ARCH_LIST} "9.0")
endif()
find_package(Torch REQUIRED)
find_package(CUDAToolkit REQUIRED)
get_filename_component(HOSTFUSE_TORCH_LIBRARY_DIR "${TORCH_LIBRARY}" DIRECTORY)

set(HOSTFUSE_WARNING_FLAGS -Wall -Wextra)
if(HOSTFUSE_WERROR)
  list(APPEND HOSTFUSE_WARNING_FLAGS -Werror)
endif()
