# Run at every build (CMakeLists.txt, target peerless_git_sha): writes OUT, the header that gives
# sweep results their git_sha, as `#define PEERLESS_GIT_SHA "<commit>"`: $PEERLESS_COMMIT when set
# (the GPU machine's copy of the tree has no current git metadata; bench/gpu_common.sh passes it),
# else `git rev-parse` of SRC, with "-dirty" when tracked files have changes. The file is rewritten
# only when its text changes, so an unchanged commit recompiles nothing.
if(NOT "$ENV{PEERLESS_COMMIT}" STREQUAL "")
  set(sha "$ENV{PEERLESS_COMMIT}")
else()
  execute_process(COMMAND git rev-parse --short=12 HEAD WORKING_DIRECTORY ${SRC}
                  OUTPUT_VARIABLE sha OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  execute_process(COMMAND git status --porcelain --untracked-files=no WORKING_DIRECTORY ${SRC}
                  OUTPUT_VARIABLE dirty OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
  if(sha AND dirty)
    string(APPEND sha "-dirty")
  endif()
endif()
set(text "#define PEERLESS_GIT_SHA \"${sha}\"\n")
set(old "")
if(EXISTS ${OUT})
  file(READ ${OUT} old)
endif()
if(NOT old STREQUAL text)
  file(WRITE ${OUT} "${text}")
endif()
