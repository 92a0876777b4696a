//! Runtime SIMD dispatch: hot loops are written once in plain Rust; `multiversion!` compiles a
//! function twice, for baseline x86-64 and for AVX2 + FMA, and picks one at run time (std caches
//! the CPU check). Kernels called from its body must be `#[inline(always)]` so they are compiled
//! into each version. (A generic closure trampoline does not work: LLVM keeps closure bodies as
//! separate baseline functions.)

/// Defines `fn NAME(args) -> R { body }` with an AVX2 + FMA twin chosen at run time.
#[macro_export]
macro_rules! multiversion {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),* $(,)?) $(-> $ret:ty)? $body:block) => {
        $(#[$meta])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn portable($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                    portable($($arg),*)
                }
                if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                    // SAFETY: the CPU supports AVX2 and FMA, checked just above.
                    return unsafe { avx2($($arg),*) };
                }
            }
            portable($($arg),*)
        }
    };
}

/// The instruction set `multiversion!` functions use on this machine, for reports.
pub fn level() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            return "avx2+fma";
        }
        return "sse2";
    }
    #[allow(unreachable_code)]
    "portable"
}
