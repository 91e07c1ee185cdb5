//! The VMM task: one per Linux compartment. It will run the vCPU exit loop over L4 IPC
//! (see issue 4); for now the crate only reserves its place in the workspace.
#![no_std]
